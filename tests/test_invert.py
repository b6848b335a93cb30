"""Inversion stage: direct (optimisation) inversion, identity, unCLIP wiring, text retrieval, errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from skimage import data as skdata
from torch import nn

from recon_lightning import invert
from recon_lightning.backbones import Backbone
from recon_lightning.errors import ConfigError, DataError, ModelMismatchError
from recon_lightning.image_params import Augment, DIPParam, FourierParam, PixelParam, build_param
from recon_lightning.invert import DirectInversion, cosine_of_images, invert_direct, to_uint8
from recon_lightning.training import steps_loader
from recon_lightning.storage import save_tensors

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "invert" / "default.yaml"


class TinyCNN(Backbone):
    """A tiny random-init image backbone with the real interface (mean/std applied inside)."""

    def __init__(self, size=(3, 32, 32), dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.name, self.input_size, self.embed_dim = "tiny_cnn", tuple(size), dim
        self.net = nn.Sequential(
            nn.Conv2d(size[0], 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, dim, bias=False),
        )
        self.eval().requires_grad_(False)

    def embed_pixels(self, x):
        return self.net((x - 0.5) / 0.25)


class TinyText(Backbone):
    """Bag of hashed words through a fixed random projection: similar sentences, similar vectors."""

    modality = "text"

    def __init__(self, dim=48):
        super().__init__()
        self.name, self.embed_dim = "tiny_text", dim
        self.register_buffer("proj", torch.randn(997, dim, generator=torch.Generator().manual_seed(0)))

    def embed(self, texts):
        out = torch.zeros(len(texts), self.embed_dim)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i] += self.proj[sum(map(ord, w)) * 31 % 997]
        return out


def icfg(**over):
    cfg = OmegaConf.load(CONFIG)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def photos(bb):
    return bb.to_pixels([skdata.chelsea(), skdata.coffee()])


def fit_module(module, steps):
    trainer = L.Trainer(max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, train_dataloaders=steps_loader(steps))


# ----------------------------------------------------------------------------- direct inversion


@pytest.mark.slow
def test_direct_inversion_recovers_embedding_of_known_image():
    bb = TinyCNN()
    target = bb.embed_pixels(photos(bb))
    baseline = cosine_of_images(bb, to_uint8(torch.rand(2, 3, 32, 32)), target)
    x = invert_direct(bb, target, icfg(steps=60, batch_size=2, param="fourier"))
    assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    cos = cosine_of_images(bb, to_uint8(x), target)
    assert (cos > 0.9).all(), cos
    assert (cos > baseline + 0.2).all(), (cos, baseline)


@pytest.mark.parametrize(
    "param, over",
    [
        ("pixels", {"decorrelate": False, "scales": [1.0]}),
        ("pixels", {"augment.crop_scale": [1.0, 1.0], "augment.flip": False, "augment.rotate": 0.0}),
        ("fourier", {"fourier.decay": 1.5, "augment.copies": 1, "l2_weight": 0.1}),
        ("dip", {"dip.channels": [8, 16], "dip.skip": 2, "dip.input_channels": 8, "scales": [0.5, 1.0]}),
        ("dip", {"dip.channels": [8], "dip.skip": 0, "dip.input_channels": 4, "dip.input_noise": 0.0, "tv_weight": 0.0}),
    ],
)
@pytest.mark.slow
def test_every_parameterisation_and_option_improves_the_cosine(param, over):
    bb = TinyCNN(size=(3, 24, 24), dim=24)
    target = bb.embed_pixels(photos(bb))
    L.seed_everything(0, verbose=False)
    over = {"augment.copies": 2, **over}
    module = DirectInversion(bb, target, icfg(param=param, **over), steps=30)
    before = cosine_of_images(bb, to_uint8(module.final_images()), target)
    fit_module(module, 30)
    after = cosine_of_images(bb, to_uint8(module.final_images()), target)
    assert (after > before + 0.05).all(), (before, after)
    assert not bb.training  # the frozen backbone stays in eval mode during fitting


def test_coarse_to_fine_schedule_and_coarse_updates():
    bb = TinyCNN()
    module = DirectInversion(bb, torch.randn(1, 32), icfg(param="pixels", scales=[0.25, 0.5, 1.0]), steps=30)
    assert [module.resolution(s) for s in (0, 9, 10, 29)] == [(8, 8), (8, 8), (16, 16), (32, 32)]
    # Pixels at a coarse scale: the gradient is constant within each 4x4 block.
    p = PixelParam(1, (3, 32, 32), decorrelate=False, init_std=1.0)  # blocks differ clearly
    p(( 8, 8)).sum().backward()
    g = p.logits.grad[0, 0]
    assert torch.allclose(g[:4, :4], g[0, 0].expand(4, 4))
    assert not torch.allclose(g[0, 0], g[4, 4])
    # Fourier at a coarse scale renders no frequency above that scale's Nyquist limit.
    f = FourierParam(1, (3, 32, 32), init_std=1.0)
    spec = torch.fft.rfft2(torch.logit(f((8, 8)).detach().clamp(1e-6, 1 - 1e-6)))
    assert spec[..., 8:, 8:].abs().max() < 1e-3 * spec.abs().max()
    spec_full = torch.fft.rfft2(torch.logit(f((32, 32)).detach().clamp(1e-6, 1 - 1e-6)))
    assert spec_full[..., 8:12, 8:12].abs().max() > 1e-2 * spec_full.abs().max()


def test_dip_images_are_independent_networks():
    p = DIPParam(2, (3, 16, 16), channels=(8, 16), skip=2, input_channels=4)
    out = p((16, 16))
    assert out.shape == (2, 3, 16, 16)
    out[0].sum().backward()  # image 0's loss must not touch image 1's network
    w = p.down[0][0][0].weight.grad  # grouped conv: first half of output channels = image 0
    half = w.shape[0] // 2
    assert w[:half].abs().sum() > 0 and w[half:].abs().sum() == 0
    with pytest.raises(ConfigError, match="unknown invert.param"):
        build_param("wavelets", 1, (3, 8, 8), icfg())


@pytest.mark.parametrize(
    "kw",
    [dict(crop_scale=(0.5, 0.5)), dict(jitter=0.1), dict(flip=True), dict(rotate=20.0), dict(color=0.2), dict(noise=0.05)],
)
def test_each_augmentation_changes_images_per_sample_and_is_differentiable(kw):
    torch.manual_seed(0)
    x = photos(TinyCNN()).repeat(4, 1, 1, 1)[:6].requires_grad_(True)  # identical pairs of images
    y = Augment(**kw)(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x, atol=1e-3)
    if kw != dict(flip=True):  # a flip may by chance hit (or miss) every sample
        assert not torch.allclose(y[0], y[2], atol=1e-4)  # per-sample randomness on equal inputs
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # All options off: identity.
    assert torch.allclose(Augment()(x), x)


def test_bad_augment_config_is_config_error():
    from recon_lightning.config import shipped
    from recon_lightning.invert import InvertConfig

    with pytest.raises(ConfigError, match=r"config key 'invert.augment.crop_scale' must be > 0, got \[0.0, 1.0\]"):
        shipped(InvertConfig, "invert/default", augment={"crop_scale": [0.0, 1.0]})


# ----------------------------------------------------------------------------- the stage


def write_run(run_dir: Path, x: torch.Tensor, meta: dict | None = None, images: torch.Tensor | None = None):
    n = len(x)
    save_tensors(run_dir / "select" / "selection.safetensors",
                 {"x": x, "candidate_index": torch.arange(n) + 100, "score": torch.linspace(1, 0, n),
                  "cluster_size": torch.ones(n, dtype=torch.long), "y": torch.zeros(n, dtype=torch.long)})
    save_tensors(run_dir / "embed" / "embeddings.safetensors", {"train_x": x}, {"normalize": "none", **(meta or {})})
    if images is not None:
        save_tensors(run_dir / "embed" / "images.safetensors", {"train": images, "test": images.clone()})


@pytest.mark.slow
def test_stage_writes_pngs_and_json_with_true_cosines(make_cfg, tmp_path, monkeypatch):
    bb = TinyCNN()
    target = bb.embed_pixels(photos(bb))
    run_dir = tmp_path / "run"
    write_run(run_dir, torch.cat([target, target.flip(0)]))
    monkeypatch.setattr(invert, "build_backbone", lambda cfg, input_size=None: TinyCNN())
    cfg = make_cfg("invert.steps=20", "invert.batch_size=2", "invert.num_images=3", "invert.param=pixels")
    summary = invert.run_stage(cfg, run_dir)
    rows = json.loads((run_dir / "invert" / "inversion.json").read_text())
    assert [r["rank"] for r in rows] == [0, 1, 2] and summary["n"] == 3
    assert [r["candidate_index"] for r in rows] == [100, 101, 102]
    for r in rows:
        img = invert.load_png(run_dir / r["path"], 3)
        assert img.shape == (3, 32, 32)
        # The reported cosine is that of the PNG on disk, without augmentation.
        recomputed = cosine_of_images(bb, img[None], torch.cat([target, target.flip(0)])[r["rank"] : r["rank"] + 1])
        assert abs(recomputed.item() - r["cosine"]) < 1e-4
    assert summary["mean_cosine"] == pytest.approx(np.mean([r["cosine"] for r in rows]))


def test_identity_backbone_writes_the_embedding_as_image(make_cfg, tmp_path):
    imgs = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    x = imgs.flatten(1).float() / 255
    run_dir = tmp_path / "run"
    write_run(run_dir, x, {"input_size": [1, 8, 8]}, images=imgs)
    summary = invert.run_stage(make_cfg("backbone=identity", "invert.identity_scaling=clip"), run_dir)
    rows = json.loads((run_dir / "invert" / "inversion.json").read_text())
    assert summary["method"] == "identity" and len(rows) == 3
    for r in rows:
        assert torch.equal(invert.load_png(run_dir / r["path"], 1), imgs[r["rank"]])
        assert r["cosine"] == pytest.approx(1.0, abs=1e-6)
    # L2-normalised pixels are rescaled per image (min-max), not clipped into black.
    scaled = invert.identity_images(x * 0.01 - 0.3, (1, 8, 8), "auto", "l2")
    assert torch.allclose(scaled.flatten(1).amax(1), torch.ones(3)) and torch.allclose(scaled.flatten(1).amin(1), torch.zeros(3))


def test_identity_pngs_of_small_scale_candidates_are_scaled_not_near_black(make_cfg, tmp_path):
    """Reconstructions are known only up to scale: by default (invert.identity_scaling=minmax, as in
    the report's grids) each PNG spans 0..255; clipping left them near black (peaks of 12-71)."""
    from PIL import Image

    imgs = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    run_dir = tmp_path / "run"
    write_run(run_dir, imgs.flatten(1).float() / 255 * 0.1, {"input_size": [1, 8, 8]}, images=imgs)  # 1/10 scale
    invert.run_stage(make_cfg("backbone=identity"), run_dir)
    for row in json.loads((run_dir / "invert" / "inversion.json").read_text()):
        png = np.asarray(Image.open(run_dir / row["path"]))
        assert png.max() == 255 and png.min() == 0


def test_mismatched_embedding_size_is_model_mismatch(make_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_run(run_dir, torch.randn(2, 20))
    monkeypatch.setattr(invert, "build_backbone", lambda cfg, input_size=None: TinyCNN(dim=32))
    with pytest.raises(ModelMismatchError, match="20-d .* 32-d"):
        invert.run_stage(make_cfg(), run_dir)
    with pytest.raises(ModelMismatchError, match="embedding size mismatch"):
        invert_direct(TinyCNN(dim=32), torch.randn(1, 16), icfg())


def test_missing_or_corrupt_selection_is_data_error(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="selection"):
        invert.run_stage(make_cfg(), run_dir)
    (run_dir / "select").mkdir(parents=True)
    (run_dir / "select" / "selection.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="corrupt"):
        invert.run_stage(make_cfg(), run_dir)
    save_tensors(run_dir / "select" / "selection.safetensors", {"x": torch.full((2, 4), float("nan")), "candidate_index": torch.arange(2),
                                                                  "score": torch.ones(2), "cluster_size": torch.ones(2), "y": torch.zeros(2)})
    with pytest.raises(DataError, match="NaN"):
        invert.run_stage(make_cfg(), run_dir)


# ----------------------------------------------------------------------------- text


def test_text_retrieval_finds_the_sentence(make_cfg, tmp_path, monkeypatch):
    corpus = [
        "the cat sat on the warm mat",
        "stock markets fell sharply on monday",
        "the team won the championship final",
        "heavy rain is expected this weekend",
        "a new vaccine trial shows promise",
    ]
    path = tmp_path / "corpus.tsv"
    path.write_text("".join(f"topic{i}\t{t}\n" for i, t in enumerate(corpus)))
    bb = TinyText()
    # Targets: embeddings of two corpus sentences, slightly perturbed (as a reconstruction would be).
    x = bb.embed([corpus[2], corpus[4]])
    x = x + 0.05 * x.norm(dim=1, keepdim=True) * torch.randn_like(x) / x.shape[1] ** 0.5
    run_dir = tmp_path / "run"
    write_run(run_dir, x, {"modality": "text"})
    monkeypatch.setattr(invert, "build_backbone", lambda cfg, input_size=None: TinyText())
    summary = invert.run_stage(make_cfg(f"invert.text_corpus={path}", "invert.top_k=3"), run_dir)
    rows = json.loads((run_dir / "invert" / "text_matches.json").read_text())
    assert [r["matches"][0]["text"] for r in rows] == [corpus[2], corpus[4]]
    assert all(len(r["matches"]) == 3 for r in rows)
    assert all(r["matches"][0]["cosine"] > 0.95 > r["matches"][1]["cosine"] for r in rows)
    assert summary["corpus_size"] == 5
    with pytest.raises(DataError, match="not found"):
        invert.run_stage(make_cfg(f"invert.text_corpus={tmp_path / 'nope.txt'}"), run_dir)


# ----------------------------------------------------------------------------- real backbone kinds


@pytest.mark.slow
def test_inversion_through_a_tiny_timm_vit():
    from recon_lightning.backbones import build_backbone

    bb = build_backbone({"kind": "timm", "model": "test_vit", "pretrained": False})
    img = bb.to_pixels([skdata.chelsea()])
    target = bb.embed_pixels(img)
    L.seed_everything(0, verbose=False)
    module = DirectInversion(bb, target, icfg(param="fourier", scales=[0.5, 1.0], **{"augment.copies": 1}), steps=15)
    before = cosine_of_images(bb, to_uint8(module.final_images()), target)
    fit_module(module, 15)
    after = cosine_of_images(bb, to_uint8(module.final_images()), target)
    assert after.item() > before.item() + 0.05, (before, after)


# ----------------------------------------------------------------------------- unCLIP


def tiny_unclip_pipeline(embed_dim=32):
    """A randomly initialised Stable unCLIP pipeline built from component configs (no download),
    sized like diffusers' own fast tests; the tokenizer comes from a tiny in-memory vocabulary."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=embed_dim, projection_dim=embed_dim,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=16))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), attention_head_dim=(2, 4),
        class_embed_type="projection", projection_class_embeddings_input_dim=embed_dim * 2,
        cross_attention_dim=embed_dim, layers_per_block=1, upcast_attention=True, use_linear_projection=True)
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=embed_dim, projection_dim=embed_dim, num_hidden_layers=1, num_attention_heads=4,
            image_size=32, intermediate_size=37, patch_size=8)),
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=AutoencoderKL(),
    )


@pytest.mark.slow
def test_unclip_end_to_end_with_tiny_pipeline(make_cfg, tmp_path, monkeypatch):
    from recon_lightning import invert_unclip

    folder = tmp_path / "tiny_unclip"
    tiny_unclip_pipeline().save_pretrained(folder)  # loaded back through the real from_pretrained path
    bb = TinyCNN(dim=32)
    target = bb.embed_pixels(photos(bb))
    run_dir = tmp_path / "run"
    write_run(run_dir, target, {"normalize": "l2"})
    over = [f"invert.unclip.model={folder}", "invert.unclip.steps=2", "invert.unclip.height=16", "invert.unclip.width=24",
            "invert.batch_size=2", "invert.device=cpu"]
    cfg = make_cfg("invert.method=unclip", *over)

    # Decoder output at the configured size.
    pipe, kind = invert_unclip.load_pipeline(str(folder), torch.device("cpu"), torch.float32)
    assert kind == "stable_unclip"
    arr = invert_unclip.decode(pipe, kind, target, cfg.invert.unclip, torch.Generator().manual_seed(0))
    assert arr.shape == (2, 16, 24, 3) and np.isfinite(arr).all() and 0 <= arr.min() and arr.max() <= 1
    # Embedding scale: L2-normalised targets are rescaled to the decoder's statistics (mean 0, std 1 -> sqrt(32)).
    assert invert_unclip.target_norm("auto", pipe, kind, {"normalize": "l2"}) == pytest.approx(32 ** 0.5)

    # The whole stage: PNGs at the backbone's input size, cosines reported.
    monkeypatch.setattr(invert, "build_backbone", lambda cfg, input_size=None: TinyCNN(dim=32))
    summary = invert.run_stage(cfg, run_dir)
    rows = json.loads((run_dir / "invert" / "inversion.json").read_text())
    assert summary["method"] == "unclip" and len(rows) == 2
    # Each reported cosine is that of its PNG on disk through the backbone, against its target.
    for r in rows:
        png = invert.load_png(run_dir / r["path"], 3).float()[None] / 255
        expected = torch.nn.functional.cosine_similarity(TinyCNN(dim=32).embed_pixels(png), target[r["rank"]][None])
        assert r["cosine"] == pytest.approx(expected.item(), abs=1e-4)
    assert invert.load_png(run_dir / rows[0]["path"], 3).shape == (3, 32, 32)

    # A decoder whose embedding size differs from the backbone's is a clear mismatch.
    monkeypatch.setattr(invert, "build_backbone", lambda cfg, input_size=None: TinyCNN(dim=16))
    write_run(run_dir, torch.randn(2, 16))
    with pytest.raises(ModelMismatchError, match="32-d"):
        invert.run_stage(cfg, run_dir)


def test_unclip_checks_the_backbone_shares_the_decoder_embedding_space():
    from recon_lightning.invert_unclip import check_embedding_space

    sd = "stabilityai/stable-diffusion-2-1-unclip"
    ok = OmegaConf.create({"kind": "open_clip", "model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"})
    assert check_embedding_space(ok, sd, 1024).dim == 1024
    with pytest.raises(ConfigError, match="ViT-H-14.*laion2b_s32b_b79k"):
        check_embedding_space(OmegaConf.create({"kind": "timm", "model": "vit_small_patch16_224.dino"}), sd, 384)
    with pytest.raises(ConfigError, match="pretrained='openai'"):
        check_embedding_space(OmegaConf.create({"kind": "open_clip", "model": "ViT-H-14", "pretrained": "openai"}), sd, 1024)
    vitl = OmegaConf.create({"kind": "open_clip", "model": "ViT-L-14", "pretrained": "openai"})
    assert check_embedding_space(vitl, "kakaobrain/karlo-v1-alpha-image-variations", 768).pipeline == "karlo"
    with pytest.raises(ConfigError, match="ViT-H-14"):
        check_embedding_space(vitl, sd, 768)
    with pytest.raises(ConfigError, match="neither a known unCLIP decoder"):
        invert_unclip_kind("/no/such/pipeline")


def invert_unclip_kind(model):
    from recon_lightning.invert_unclip import pipeline_kind

    return pipeline_kind(model)


@pytest.mark.slow
def test_inversion_many_steps_per_lightning_step_equal_one(tmp_path):
    """Direct inversion: 10 optimisation steps per Lightning step give the images of 1 per Lightning step."""
    from recon_lightning.invert import inner_steps

    bb = TinyCNN()
    target = torch.randn(2, 32)
    images = []
    for log_every, ckpt in ((10, 20), (1, 0)):
        cfg = icfg(param="pixels", scales=[0.5, 1.0], log_every_n_steps=log_every, checkpoint_every_n_steps=ckpt)
        assert inner_steps(cfg, 30) == (10 if log_every == 10 else 1)
        L.seed_everything(0, verbose=False)
        module = DirectInversion(bb, target, cfg, steps=30)
        trainer = L.Trainer(max_steps=30, max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=False)
        trainer.fit(module, train_dataloaders=steps_loader(30 // module.steps_per_call))
        assert trainer.global_step == 30
        images.append(module.final_images())
    torch.testing.assert_close(images[0], images[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_resumed_inversion_with_the_default_augmentations_equals_an_uninterrupted_one(tmp_path):
    """The augmentations' (and DIP's input noise) randomness at step s is drawn from a seed of (invert.seed, the
    batch's targets, s), so a batch resumed from its checkpoint draws what the uninterrupted fit drew."""
    from recon_lightning.invert import invert_batch
    from recon_lightning.training import checkpointing

    bb, targets = TinyCNN(), torch.randn(2, 32, generator=torch.Generator().manual_seed(1))

    def trainer(name, max_steps):
        callback, _ = checkpointing(tmp_path, "invert", 4, name=name)
        return L.Trainer(max_steps=max_steps, max_epochs=1, logger=False, callbacks=[callback], enable_model_summary=False,
                         enable_progress_bar=False)

    for param in ("fourier", "dip"):
        cfg = icfg(param=param, steps=8, checkpoint_every_n_steps=4, log_every_n_steps=4, scales=[1.0],
                   dip={"channels": [4, 8], "skip": 2, "input_channels": 4, "input_noise": 0.05})
        assert cfg.augment.copies > 1 and cfg.augment.flip and cfg.augment.noise > 0  # the shipped augmentations
        whole = invert_batch(bb, targets, cfg, [0, 1], trainer(f"whole_{param}", 8))
        invert_batch(bb, targets, cfg, [0, 1], trainer(f"killed_{param}", 4))  # stops after its step-4 checkpoint
        ckpt = tmp_path / f"invert/checkpoints/killed_{param}/last.ckpt"
        resumed = invert_batch(bb, targets, cfg, [0, 1], trainer(f"resumed_{param}", 8), ckpt_path=str(ckpt))
        torch.testing.assert_close(resumed, whole, rtol=0, atol=1e-6, msg=param)
