"""Many optimisation steps per Lightning step: equivalence with one step per Lightning step and with the
earlier per-run formulation, runs_per_batch=auto, and trainer.precision in the reconstruct stage."""

from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from recon_lightning import reconstruct as R
from recon_lightning.config import check_values
from recon_lightning.errors import ConfigError
from recon_lightning.kkt import KKTObjective
from recon_lightning.run_optim import RunwiseOptimizer
from recon_lightning.storage import load_tensors
from recon_lightning.victim import VictimMLP, save_victim

F64 = torch.float64


def _victim_dir(tmp_path, name="run", D=8, H=16, n_train=4, weight_decay=1e-2):
    torch.manual_seed(0)
    v = VictimMLP(D, [H], 2, bias=[True, False], center=True)
    v.input_mean.copy_(torch.rand(D))
    run_dir = tmp_path / name
    save_victim(run_dir / "classifier", v, {"loss": "bce", "weight_decay": weight_decay, "n_train": n_train,
                                           "embedding": {"normalize": "none", "backbone_name": "identity"}})
    return run_dir


def _stage(make_cfg, run_dir, *overrides):
    cfg = make_cfg("logger.name=csv", "reconstruct.num_runs=3", "reconstruct.runs_per_batch=3", "reconstruct.steps=40",
                   "reconstruct.dtype=float64", "reconstruct.lr=[0.001, 0.05]", "reconstruct.score_with_train=false",
                   *overrides, run_dir=run_dir)
    R.run_stage(cfg, run_dir)
    return [load_tensors(R.run_path(run_dir, r)) for r in range(3)]


def test_kkt_explicit_gradient_equals_autograd_double_backward():
    torch.manual_seed(0)
    for C, hidden, act, mult, wd in itertools.product([2, 3], [[7], [7, 6]], ["relu_sigmoid_grad", "softplus"],
                                                      ["runner_up", "all"], [0.0, 0.1]):
        v = VictimMLP(5, hidden, C, bias=[True] + [False] * len(hidden)).double()
        form = ("binary" if C == 2 else "multiclass") + ("_wd" if wd else "")
        obj = KKTObjective(v, {"weight_decay": wd, "n_train": 4}, form, act, F64, multipliers=mult, per_candidate=True)
        x = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
        lam = torch.rand((3, 4, C) if obj.per_class_multipliers else (3, 4), dtype=F64, requires_grad=True)
        y = torch.randint(0, C, (4,)).expand(3, -1)
        alpha = torch.tensor([10.0, 50.0, 300.0], dtype=F64)
        a, _ = obj.kkt(x, lam, y, alpha)
        b, _ = obj.kkt_autograd(x, lam, y, alpha)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        for ga, gb in zip(torch.autograd.grad(a.sum(), [x, lam]), torch.autograd.grad(b.sum(), [x, lam])):
            torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_runwise_optimizer_is_torchs_per_run(kind):
    torch.manual_seed(0)
    lrs = torch.tensor([1e-3, 1e-2, 0.1], dtype=F64)
    start = torch.randn(3, 5, 2, dtype=F64)
    stacked = start.clone().requires_grad_()
    singles = [start[k].clone().requires_grad_() for k in range(3)]
    active = torch.tensor([True, True, False])
    opt = RunwiseOptimizer([{"params": [stacked], "lr": lrs}], kind, active=lambda: active)
    groups = [{"params": [singles[k]], "lr": float(lrs[k])} for k in range(2)]  # run 2 inactive: never stepped
    ref = torch.optim.Adam(groups) if kind == "adam" else torch.optim.SGD(groups, momentum=0.9)
    for _ in range(20):
        g = torch.randn(3, 5, 2, dtype=F64)
        g[2] = float("nan")  # an inactive run's NaN gradient changes nothing
        stacked.grad = g.clone()
        opt.step()
        for k in range(2):
            singles[k].grad = g[k].clone()
        ref.step()
    for k in range(2):
        torch.testing.assert_close(stacked[k], singles[k], rtol=1e-12, atol=1e-14)
    assert torch.equal(stacked[2], start[2])


@pytest.mark.slow
def test_many_steps_per_lightning_step_give_the_same_candidates(tmp_path, make_cfg):
    """log/checkpoint cadences of 10 steps: 10 optimisation steps per Lightning step, one host read each; the same
    candidates as 1 step per Lightning step, and as the earlier formulation (one parameter and torch optimiser group
    per run, the objective by autograd's double backward) stepped in a plain loop."""
    many = _stage(make_cfg, _victim_dir(tmp_path, "many"), "reconstruct.log_every_n_steps=10",
                  "reconstruct.checkpoint_every_n_steps=20")
    one = _stage(make_cfg, _victim_dir(tmp_path, "one"), "reconstruct.log_every_n_steps=1",
                 "reconstruct.checkpoint_every_n_steps=0")
    assert R.inner_steps({"steps": 40, "log_every_n_steps": 10, "checkpoint_every_n_steps": 20}) == 10
    assert R.inner_steps({"steps": 40, "log_every_n_steps": 1, "checkpoint_every_n_steps": 0}) == 1
    for (ta, ma), (tb, mb) in zip(many, one):
        assert ma["steps"] == mb["steps"] == 40 and ma["status"] == mb["status"] == "ok"
        torch.testing.assert_close(ta["x"], tb["x"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ta["lam"], tb["lam"], rtol=1e-6, atol=1e-7)
    # The logger's x axis is the optimisation step: every 10th.
    import csv

    rows = list(csv.DictReader(open(tmp_path / "many" / "reconstruct" / "logs" / "metrics.csv")))
    assert [int(float(r["step"])) for r in rows if r.get("kkt_rel_min")][:4] == [10, 20, 30, 40]

    # The earlier formulation, by hand.
    from recon_lightning.fit import load_config
    from recon_lightning.kkt import prior_penalty
    from recon_lightning.victim import load_victim

    run_dir = tmp_path / "one"
    victim, spec = load_victim(run_dir / "classifier")
    cfg = load_config([f"run_dir={run_dir}", "reconstruct.num_runs=3", "reconstruct.steps=40", "reconstruct.dtype=float64",
                       "reconstruct.lr=[0.001, 0.05]"])
    plan = R._plan(cfg, spec)
    rcfg = plan["rcfg"]
    obj = KKTObjective(victim, spec, plan["form"], rcfg["activation"], F64, per_candidate=True)
    y = R.candidate_labels(2, plan["per_class"])
    mean = victim.input_offset().double()
    # The pull onto the victim's live first-layer hyperplanes (reconstruct.hyperplane_weight), by hand.
    w, b, nxt = (victim.layers[0].weight.detach().double(), victim.layers[0].bias.detach().double(),
                 victim.layers[1].weight.detach().double())
    live = w.norm(dim=1) * nxt.norm(dim=0) > (w.norm(dim=1) * nxt.norm(dim=0)).max() * 1e-2
    w_norm = w[live].norm(dim=1)
    tau = float(rcfg["hyperplane_tau"]) * float((b[live] / w_norm).abs().median())
    for r in range(3):
        h = plan["hparams"][r]
        g = torch.Generator().manual_seed(h["init_seed"])
        x = (torch.randn(len(y), 8, generator=g, dtype=F64) * h["init_scale"]).requires_grad_()
        lam = torch.rand(len(y), generator=g, dtype=F64).requires_grad_()
        opt = torch.optim.Adam([{"params": [x], "lr": h["lr"]}, {"params": [lam], "lr": h["lambda_lr"]}])
        alpha, lmin = torch.tensor([h["alpha"]], dtype=F64), torch.tensor([h["lambda_min"]], dtype=F64)
        for _ in range(40):
            _, rel = obj.kkt_autograd(x[None], lam[None], y[None], alpha)
            pen = obj.lambda_penalty(lam[None], y[None], lmin)
            prior = prior_penalty((x + mean)[None], plan["prior"], None, 0.0, 1.0)
            planes = torch.log1p(((x @ w[live].T + b[live]) / w_norm / tau) ** 2).mean()
            loss = (rel + float(rcfg["lambda_weight"]) * pen + float(rcfg["prior_weight"]) * prior).sum() \
                + float(rcfg["hyperplane_weight"]) * planes
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                obj.project_lambda(lam)
        torch.testing.assert_close(one[r][0]["x"].double(), (x + mean).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_that_fails_inside_the_inner_loop_is_frozen_and_reported_with_its_step(tmp_path, make_cfg, monkeypatch):
    """A run whose loss turns NaN mid-call is masked on the device; the host learns of it at the end of the call and
    records the step where it happened; the other runs are unaffected."""
    real = R.ReconstructionModule._terms

    def poisoned(self, x, lam):
        terms = real(self, x, lam)
        if self.steps_done() >= 13:  # run 1 breaks at step 13, inside the second Lightning step of 10
            terms = {**terms, "total": terms["total"] * torch.tensor([1.0, float("nan"), 1.0], dtype=x.dtype)}
        return terms

    monkeypatch.setattr(R.ReconstructionModule, "_terms", poisoned)
    runs = _stage(make_cfg, _victim_dir(tmp_path), "reconstruct.log_every_n_steps=10", "reconstruct.checkpoint_every_n_steps=0")
    assert [m["status"] for _, m in runs] == ["ok", "failed", "ok"]
    assert "at step 13" in runs[1][1]["error"]


def test_runs_per_batch_auto_fits_the_memory_it_is_given():
    per_run, fixed = 100 * 2**20, 50 * 2**20
    # 8 GiB free, 85 % usable: (6963 - 50) / 100 = 69 runs fit -> 64 (a power of two: stable across reruns)
    assert R.auto_runs_per_batch(per_run, fixed, 8 * 2**30, runs=1000) == 64
    assert R.auto_runs_per_batch(per_run, fixed, 8 * 2**30, runs=20) == 20  # all of this rank's runs in one batch
    assert R.auto_runs_per_batch(per_run, fixed, 10**15, runs=10**6) == R.MAX_AUTO_RUNS
    assert R.auto_runs_per_batch(per_run, fixed, 300 * 2**20, runs=100) == 2
    assert R.auto_runs_per_batch(per_run, fixed, 8 * 2**30, runs=1000, interrupted=48) == 48  # resume that batch
    assert R.auto_runs_per_batch(per_run, fixed, 8 * 2**30, runs=1000, interrupted=500) == 64  # no longer fits
    with pytest.raises(ConfigError, match="runs_per_batch=auto: one run needs"):
        R.auto_runs_per_batch(per_run, fixed, 100 * 2**20, runs=10)
    # The estimate grows with the victim and the candidates, doubles in float64.
    small = KKTObjective(VictimMLP(64, [1000], 2), {}, "binary", "relu_sigmoid_grad")
    big = KKTObjective(VictimMLP(768, [1000, 1000], 2), {}, "binary", "relu_sigmoid_grad")
    a = R.run_memory_bytes(small, 200, 64, torch.float32)
    assert R.run_memory_bytes(big, 1000, 768, torch.float32) > 10 * a
    assert R.run_memory_bytes(small, 200, 64, torch.float64) == 2 * a


def _mem_available() -> int:
    line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux's /proc/meminfo")
def test_available_memory_is_the_kernels_memavailable(monkeypatch):
    """The free RAM runs_per_batch=auto plans with: MemAvailable (psutil's "available" on Linux), also read from
    /proc/meminfo when psutil is missing. 5 %: other processes allocate between the two readings."""
    assert R.available_memory(torch.device("cpu")) == pytest.approx(_mem_available(), rel=0.05)
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    assert R.available_memory(torch.device("cpu")) == pytest.approx(_mem_available(), rel=0.05)


def test_runs_per_batch_auto_in_the_stage(tmp_path, make_cfg, monkeypatch):
    monkeypatch.setattr(R, "available_memory", lambda device: 3 * R.run_memory_bytes(
        KKTObjective(VictimMLP(8, [16], 2, bias=[True, False]), {}, "binary", "relu_sigmoid_grad", F64), 8, 8, F64))
    run_dir = _victim_dir(tmp_path)
    cfg = make_cfg("logger.name=none", "reconstruct.num_runs=5", "reconstruct.runs_per_batch=auto", "reconstruct.steps=4",
                   "reconstruct.dtype=float64", "reconstruct.score_with_train=false", run_dir=run_dir)
    R.run_stage(cfg, run_dir)
    # ~3 runs' memory, half planned for on the CPU -> 1 run per batch
    assert [load_tensors(R.run_path(run_dir, r))[1]["status"] for r in range(5)] == ["ok"] * 5
    with pytest.raises(ConfigError, match="config key 'reconstruct.runs_per_batch' must be auto or an integer >= 1"):
        check_values(make_cfg("reconstruct.runs_per_batch=many", run_dir=run_dir))  # the schema's rule, before any stage


@pytest.mark.slow
def test_trainer_precision_reaches_the_reconstruct_stage(tmp_path, make_cfg):
    from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision

    run_dir = _victim_dir(tmp_path)
    cfg = make_cfg("trainer.precision=64-true", "reconstruct.dtype=float64", "trainer.accelerator=cpu", run_dir=run_dir)
    trainer = R._make_trainer(cfg, run_dir, 5, logger=False)
    assert isinstance(trainer.precision_plugin, DoublePrecision)
    assert trainer.log_every_n_steps == 1  # 50 steps per Lightning step with the default cadences
    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=cpu", run_dir=run_dir)
    trainer = R._make_trainer(cfg, run_dir, 5, logger=False)
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.precision == "bf16-mixed"
    # bf16 autocast runs the stage (the objective's products in bfloat16)
    runs = _stage(make_cfg, run_dir, "trainer.precision=bf16-mixed", "reconstruct.dtype=float32",
                  "reconstruct.steps=10", "trainer.accelerator=cpu")
    assert all(m["status"] == "ok" for _, m in runs)
    with pytest.raises(ConfigError, match="reconstruct.dtype=float64"):
        R.stage_precision(make_cfg("trainer.precision=64-true", run_dir=run_dir))
    with pytest.raises(ConfigError, match="bf16-mixed.*reconstruct.dtype=float64"):
        R.stage_precision(make_cfg("trainer.precision=bf16-mixed", "reconstruct.dtype=float64", run_dir=run_dir))
    for bad in ("16-mixed", "16", "bf16-true"):
        with pytest.raises(ConfigError, match="cannot apply to the reconstruct stage"):
            R.stage_precision(make_cfg(f"trainer.precision={bad}", run_dir=run_dir))
    # ... and it is part of the stage's fingerprint: changing it reruns reconstruct
    assert "trainer.precision" in R.STAGE.config_keys


def _inductor_compiles() -> bool:
    """Whether torch.compile works at all here, tried on a one-line function: only a missing toolchain may skip
    the test below; an error of the compiled objective itself fails it."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception:  # noqa: BLE001 - whatever inductor raises without a compiler
        return False
    return True


@pytest.mark.slow
def test_compiled_objective_gives_the_same_step(tmp_path, make_cfg):
    """reconstruct.compile=true: torch.compile of the objective (one graph: first-order backward only) steps like
    eager to rounding."""
    pytest.importorskip("torch._inductor")
    if not _inductor_compiles():
        pytest.skip("torch.compile cannot build a kernel here (no working C++ toolchain for inductor)")
    from recon_lightning.fit import load_config
    from recon_lightning.victim import load_victim

    run_dir = _victim_dir(tmp_path)
    victim, spec = load_victim(run_dir / "classifier")
    out = []
    for compile_ in (False, True):
        cfg = load_config([f"run_dir={run_dir}", "reconstruct.num_runs=2", "reconstruct.steps=5",
                           f"reconstruct.compile={str(compile_).lower()}"])
        plan = R._plan(cfg, spec)
        obj = KKTObjective(victim, spec, plan["form"], "relu_sigmoid_grad", torch.float32, per_candidate=True)
        mod = R.ReconstructionModule(obj, [0, 1], plan["hparams"][:2], R.candidate_labels(2, plan["per_class"]), 8,
                                     plan["rcfg"], plan["prior"], None, torch.float32, input_mean=victim.input_offset())
        mod.optimization_steps(mod.configure_optimizers(), 5)
        out.append(mod.x().detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-6)


def test_make_trainer_says_when_a_stage_setting_replaces_a_trainer_key(tmp_path, make_cfg, caplog):
    """A stage's own Trainer setting that replaces the user's trainer.<key> is logged; the per-rank device keys the
    sharded stages resolve from the user's own trainer.accelerator / devices are not replacements and stay quiet."""
    from recon_lightning.training import make_trainer

    cfg = make_cfg("+trainer.log_every_n_steps=7", "trainer.accelerator=auto", run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="recon_lightning.training"):
        trainer = make_trainer(cfg, tmp_path, "reconstruct", False, log_every_n_steps=1, accelerator="cpu", devices=1)
    assert trainer.log_every_n_steps == 1
    said = [r.getMessage() for r in caplog.records]
    assert any("log_every_n_steps=1" in m and "trainer.log_every_n_steps=7" in m for m in said), said
    assert not any("accelerator" in m or "devices" in m for m in said), said
