"""Reconstruction throughput: the batched kernel, the Lightning stages against plain loops, and memory per K.

    python benchmarks/bench_reconstruct.py                   # kernel: candidate-steps/s for K = 1, 16, 64 runs at once
    python benchmarks/bench_reconstruct.py --end-to-end      # the Lightning stages against plain PyTorch loops
    python benchmarks/bench_reconstruct.py --memory          # peak memory per K, paper-sized victims

A candidate-step is one optimisation step of one candidate. ``--end-to-end`` works in one process on one victim:

(a) the kernel loop (a plain loop of the stage's own batched optimisation step, ``ReconstructionModule.optimization_steps``,
    built exactly as the stage builds it) against the real reconstruct stage (``reconstruct.run_stage``: Trainer, inner
    loop, logging, checkpoints, run files, merge, as ``python -m recon_lightning.fit stage=reconstruct`` runs it);
(b) a plain PyTorch full-batch loop of the victim against the real classifier stage (``victim.run_stage``) on the
    default data (digits, raw pixels), with the classifier preset's optimiser.

Each pair is measured ``--repeats`` times, alternating which side goes first, so background load hits both alike; the
ratio is the median of the pairs' ratios. The last two lines are ``end_to_end_ratio=<x>`` (Lightning / kernel
candidate-steps/s) and ``victim_ratio=<y>`` (Lightning / plain epochs/s). On CUDA the same command measures the GPU
(defaults scale up: a 64-1000-1000-1 victim, K = 64) and prints the FLOP rate's fraction of the device's peak.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from recon_lightning import reconstruct as R
from recon_lightning.kkt import KKTObjective, prior_penalty
from recon_lightning.victim import VictimMLP, save_victim

# Dense peak TFLOP/s by data type (vendor datasheets; SXM parts), for the fraction-of-peak line.
PEAK_TFLOPS = {
    "H200": {"float64": 67.0, "float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "H100": {"float64": 67.0, "float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "A100": {"float64": 19.5, "float32": 19.5, "tf32": 156.0, "bfloat16": 312.0},
    "L40S": {"float64": 1.4, "float32": 91.6, "tf32": 183.0, "bfloat16": 362.0},
    "L4": {"float64": 0.5, "float32": 30.3, "tf32": 60.0, "bfloat16": 121.0},
    "A10": {"float64": 1.0, "float32": 31.2, "tf32": 62.5, "bfloat16": 125.0},
    "V100": {"float64": 7.8, "float32": 15.7, "tf32": 15.7, "bfloat16": 15.7},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    text = (f"hardware: {cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
            f"load average (1/5/15 min) {load}; torch {torch.__version__}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    return text


def peak_tflops(device: torch.device, dtype: torch.dtype, matmul_precision: str, autocast_bf16: bool) -> tuple[float, str] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = ("bfloat16" if autocast_bf16 else "float64" if dtype == torch.float64
            else "tf32" if matmul_precision in ("high", "medium") else "float32")
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[kind], kind
    return None


def flops_per_step(module: R.ReconstructionModule) -> float:
    """Matrix-product FLOPs of one optimisation step (forward and backward; element-wise work not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    opt = module.configure_optimizers()
    with FlopCounterMode(display=False) as counter:
        loss = module.losses()["total"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- kernel (K runs at once)


def raw_kernel_rate(objective: KKTObjective, K: int, m: int, dim: int, steps: int, device: torch.device) -> float:
    """The bare objective: one (K, m, D) leaf, one Adam, no per-run learning rates, masks or projection."""
    y = R.candidate_labels(2, m // 2).to(device).expand(K, -1)
    dtype = objective.target_sq.dtype
    x = (torch.randn(K, m, dim, device=device, dtype=dtype) * 0.01).requires_grad_()
    lam = torch.rand(K, m, device=device, dtype=dtype).requires_grad_()
    alpha = torch.full((K,), 100.0, device=device, dtype=dtype)
    lmin = torch.full((K,), 0.05, device=device, dtype=dtype)
    opt = torch.optim.Adam([x, lam], lr=1e-3)

    def step():
        _, rel = objective.kkt(x, lam, y, alpha)
        loss = rel.sum() + objective.lambda_penalty(lam, y, lmin).sum() + prior_penalty(x, "box", None, 0.0, 1.0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return K * m * steps / (time.perf_counter() - t)


def kernel_main(args, device: torch.device) -> None:
    torch.manual_seed(0)
    victim = VictimMLP(args.dim, args.hidden, 2, bias=[True] + [False] * len(args.hidden))
    objective = KKTObjective(victim, {"weight_decay": 0.0}, "binary", "relu_sigmoid_grad").to(device)
    print(f"victim {args.dim}-{'-'.join(map(str, args.hidden))}-1, {args.candidates} candidates per run, device {device}")
    print(hardware(device))
    rates = {}
    for K in args.runs_list:
        rates[K] = raw_kernel_rate(objective, K, args.candidates, args.dim, args.steps, device)
        print(f"K={K:3d}: {rates[K]:12.0f} candidate-steps/s  ({rates[K] / args.candidates / K:8.2f} steps/s per run)"
              f"  x{rates[K] / rates[args.runs_list[0]]:.2f} vs K={args.runs_list[0]}", flush=True)


# ----------------------------------------------------------------------------- end to end


def _write_victim(run_dir: Path, victim: VictimMLP, n_train: int, weight_decay: float) -> Path:
    save_victim(run_dir / "classifier", victim, {"loss": "bce", "weight_decay": weight_decay, "n_train": n_train,
                                                 "embedding": {"normalize": "none", "backbone_name": "identity"}})
    return run_dir


def reconstruct_pair(args, device: torch.device, tmp: Path) -> dict:
    from recon_lightning.fit import load_config
    from recon_lightning.victim import load_victim

    torch.manual_seed(0)
    n = args.candidates // 2  # the stage makes multiplier (2) x n_train candidates per run
    victim = VictimMLP(args.dim, args.hidden, 2, bias=[True] + [False] * len(args.hidden), center=True)
    accel = "gpu" if device.type == "cuda" else "cpu"
    overrides = ["logger.name=csv", f"trainer.accelerator={accel}", f"reconstruct.num_runs={args.runs}",
                 f"reconstruct.runs_per_batch={args.runs}", f"reconstruct.steps={args.steps}",
                 "reconstruct.score_with_train=false", f"reconstruct.dtype={args.dtype}",
                 f"reconstruct.compile={args.compile}", f"reconstruct.matmul_precision={args.matmul_precision}",
                 f"trainer.enable_progress_bar={str(not args.no_progress_bar).lower()}"]
    template = _write_victim(tmp / "template", victim, n, 1e-3)
    loaded, spec = load_victim(template / "classifier")
    cfg0 = load_config([f"run_dir={template}", *overrides])
    plan = R._plan(cfg0, spec)
    rcfg = plan["rcfg"]
    dtype = R.DTYPES[rcfg["dtype"]]
    objective = KKTObjective(loaded, spec, plan["form"], rcfg["activation"], dtype, multipliers=rcfg["multipliers"],
                             per_candidate=bool(rcfg["lambda_per_candidate"]))
    y = R.candidate_labels(2, plan["per_class"])
    m = len(y)

    def module():
        return R.ReconstructionModule(objective, list(range(args.runs)), plan["hparams"][: args.runs], y, args.dim, rcfg,
                                      plan["prior"], None, dtype, input_mean=loaded.input_offset()).to(device)

    def kernel() -> float:
        mod = module()
        opt = mod.configure_optimizers()
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(args.matmul_precision)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
        try:
            with autocast:
                mod.optimization_steps(opt, 1)  # warm-up (and compilation), as the stage's first steps
            sync(device)
            t = time.perf_counter()
            with autocast:
                mod.optimization_steps(opt, args.steps)
            mod.sync_failures()  # the one host read at the end
            sync(device)
            return args.runs * m * args.steps / (time.perf_counter() - t)
        finally:
            torch.set_float32_matmul_precision(before)

    counter = [0]

    def stage() -> float:
        counter[0] += 1
        run_dir = _write_victim(tmp / f"stage{counter[0]}", victim, n, 1e-3)
        cfg = load_config([f"run_dir={run_dir}", *overrides, f"trainer.precision={args.precision}"])
        t = time.perf_counter()
        summary = R.run_stage(cfg, run_dir)
        sync(device)
        elapsed = time.perf_counter() - t
        assert summary["runs_ok"] >= 1
        return args.runs * m * args.steps / elapsed

    flops = flops_per_step(module()) / (args.runs * m)
    print(f"reconstruct: victim {args.dim}-{'-'.join(map(str, args.hidden))}-1 (weight decay, centred), {m} candidates per "
          f"run, K={args.runs} runs, {args.steps} steps, {args.dtype}, precision {args.precision}, matmul "
          f"{args.matmul_precision}, compile {args.compile}; inner loop {R.inner_steps(rcfg)} steps per Lightning step; "
          f"{flops / 1e6:.2f} MFLOP per candidate-step (matrix products)", flush=True)
    pairs = []
    for rep in range(args.repeats):
        order = [("kernel", kernel), ("stage", stage)] if rep % 2 == 0 else [("stage", stage), ("kernel", kernel)]
        got = {}
        for name, fn in order:
            got[name] = fn()
        pairs.append(got)
        print(f"  pair {rep + 1}: kernel {got['kernel']:10.0f}  Lightning stage {got['stage']:10.0f} candidate-steps/s  "
              f"ratio {got['stage'] / got['kernel']:.3f}", flush=True)
    kernel_rate = statistics.median(p["kernel"] for p in pairs)
    flop_rate = kernel_rate * flops
    line = f"  kernel FLOP rate {flop_rate / 1e9:.1f} GFLOP/s (matrix products, median kernel rate)"
    peak = peak_tflops(device, dtype, args.matmul_precision, args.precision == "bf16-mixed")
    if peak:
        line += f" = {100 * flop_rate / (peak[0] * 1e12):.1f} % of the {peak[1]} peak ({peak[0]} TFLOP/s)"
    elif device.type == "cuda":
        line += " (peak of this GPU unknown)"
    print(line)
    raw = raw_kernel_rate(objective.to(device), args.runs, m, args.dim, max(5, args.steps // 10), device)
    print(f"  for reference, the bare objective with one Adam (no per-run learning rates or masks): {raw:.0f} candidate-steps/s")
    return {"ratio": statistics.median(p["stage"] / p["kernel"] for p in pairs), "pairs": pairs}


def victim_pair(args, device: torch.device, tmp: Path) -> dict:
    import shutil

    from recon_lightning import embed, victim as V
    from recon_lightning.fit import load_config
    from recon_lightning.victim import VictimModule, loss_fn

    accel = "gpu" if device.type == "cuda" else "cpu"
    # allow_unhealthy: a short --epochs may stop before zero training error; that changes nothing timed here
    overrides = ["logger.name=csv", f"trainer.accelerator={accel}", f"trainer.max_epochs={args.epochs}",
                 "classifier.allow_unhealthy=true", f"trainer.enable_progress_bar={str(not args.no_progress_bar).lower()}"]
    base = tmp / "victim_base"
    cfg0 = load_config([f"run_dir={base}", *overrides])
    embed.run_stage(cfg0, base)
    emb = embed.load_embeddings(base)
    c = cfg0.classifier

    def plain() -> float:
        torch.manual_seed(int(cfg0.seed))
        model = VictimMLP(emb.dim, list(c.hidden), emb.num_classes, bias=list(c.bias),
                          init_scale=list(c.init_scale), center=bool(c.center))
        if model.center:
            model.input_mean.copy_(emb.train_x.float().mean(0))
        model = model.to(device)
        x, y = emb.train_x.to(device), emb.train_y.to(device)
        module = VictimModule(model, "bce", c.optimizer, float(c.lr), float(c.momentum), float(c.weight_decay),
                              lr_schedule=c.lr_schedule, total_epochs=args.epochs)
        opt = module.configure_optimizers()
        sync(device)
        t = time.perf_counter()
        for epoch in range(args.epochs):
            module.set_lr(opt, epoch)  # the preset's schedule, as the stage sets it
            loss = loss_fn(model(x), y, "bce")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        assert torch.isfinite(loss).item()
        sync(device)
        return args.epochs / (time.perf_counter() - t)

    counter = [0]

    def stage() -> float:
        counter[0] += 1
        run_dir = tmp / f"victim{counter[0]}"
        shutil.copytree(base / "embed", run_dir / "embed")
        cfg = load_config([f"run_dir={run_dir}", *overrides])
        t = time.perf_counter()
        V.run_stage(cfg, run_dir)
        sync(device)
        return args.epochs / (time.perf_counter() - t)

    print(f"victim: {emb.dim}-{'-'.join(map(str, c.hidden))}-1 on {len(emb.train_x)} digits (classifier preset: "
          f"{c.optimizer}, lr {c.lr} {c.lr_schedule}, weight decay {c.weight_decay}), {args.epochs} full-batch epochs", flush=True)
    pairs = []
    for rep in range(args.repeats):
        order = [("plain", plain), ("stage", stage)] if rep % 2 == 0 else [("stage", stage), ("plain", plain)]
        got = {name: None for name, _ in order}
        for name, fn in order:
            got[name] = fn()
        pairs.append(got)
        print(f"  pair {rep + 1}: plain loop {got['plain']:8.0f}  Lightning stage {got['stage']:8.0f} epochs/s  ratio "
              f"{got['stage'] / got['plain']:.3f}", flush=True)
    return {"ratio": statistics.median(p["stage"] / p["plain"] for p in pairs), "pairs": pairs}


# ----------------------------------------------------------------------------- memory


def memory_main(args, device: torch.device) -> None:
    """Peak memory of one optimisation step per K for paper-sized victims (D-1000-1000-1, n = 500, m = 1000):
    measured on CUDA (max_memory_allocated); on the CPU the stage's estimate (what runs_per_batch=auto plans with),
    checked against torch's CPU memory profiler at small K."""
    print(hardware(device))
    for dim in args.memory_dims:
        torch.manual_seed(0)
        victim = VictimMLP(dim, [1000, 1000], 2, bias=[True, False, False])
        spec = {"num_classes": 2, "weight_decay": 0.0, "n_train": 500}
        objective = KKTObjective(victim, spec, "binary", "relu_sigmoid_grad", R.DTYPES[args.dtype], per_candidate=True).to(device)
        rcfg = {"init_scale": 0.01, "lr": 0.01, "lambda_lr": None, "lambda_min": 0.05, "alpha": 100.0, "kkt_loss": "relative",
                "lambda_weight": 5.0, "prior_weight": 1.0, "box": [-1.0, 1.0], "optimizer": "adam", "steps": 1,
                "log_every_n_steps": 1, "checkpoint_every_n_steps": 0}
        y = R.candidate_labels(2, 500)
        hp = R.sample_hparams(rcfg, 0, 0)

        def module_for(K):
            return R.ReconstructionModule(objective, list(range(K)), [hp] * K, y, dim, rcfg, "box", None, R.DTYPES[args.dtype])

        per_run = R.run_memory_bytes(objective, len(y), dim, R.DTYPES[args.dtype])
        print(f"victim {dim}-1000-1000-1, n=500, m=1000 candidates per run, {args.dtype}: estimate {per_run / 2**20:.0f} MiB per run")
        if device.type == "cuda":
            measured, fixed = R.measure_run_memory(module_for, device)
            print(f"  measured on {torch.cuda.get_device_name(device)}: {measured / 2**20:.0f} MiB per run + {fixed / 2**20:.0f} MiB")
            free, total = torch.cuda.mem_get_info(device)
            for K in args.memory_runs:
                if measured * K + fixed > 0.9 * free:
                    print(f"  K={K:4d}: would need ~{(measured * K + fixed) / 2**30:.1f} GiB > free {free / 2**30:.1f} GiB (skipped)")
                    continue
                peak = R.peak_step_memory(module_for, K, device)
                print(f"  K={K:4d}: peak {peak / 2**30:7.2f} GiB measured (estimate {per_run * K / 2**30:7.2f} GiB)", flush=True)
            print(f"  runs_per_batch=auto here: K={R.auto_runs_per_batch(measured, fixed, free, 10**6)} "
                  f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)")
        else:
            for K in args.memory_runs:
                print(f"  K={K:4d}: peak ~{per_run * K / 2**30:7.2f} GiB (CPU: estimated, not measured)")
            for K in (1, 2):
                print(f"  K={K}: {profiled_peak(module_for(K)) / 2**20:.0f} MiB measured by torch's CPU memory profiler "
                      f"(estimate {per_run * K / 2**20:.0f} MiB)", flush=True)
            free = R.available_memory(device)
            print(f"  runs_per_batch=auto here: K={R.auto_runs_per_batch(per_run, 0, free, 10**6, R.MEMORY_FRACTION['cpu'])} "
                  f"({free / 2**30:.1f} GiB RAM available, half of it planned for)")


def profiled_peak(module: R.ReconstructionModule) -> float:
    """Peak bytes of one CPU optimisation step: the parameters and optimiser state, plus the peak of what the step
    allocates (torch's memory profiler timeline)."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    opt = module.configure_optimizers()
    module.optimization_steps(opt, 1)  # optimiser state exists
    resident = sum(t.numel() * t.element_size() for t in [module.candidates, module.multipliers]
                   for t in [t, *[v for v in opt.state[t].values() if torch.is_tensor(v)]])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        module.optimization_steps(opt, 1)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return resident + float(np.array(sizes).sum(1).max())


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--end-to-end", action="store_true", help="Lightning stages against plain loops (see the module docstring)")
    p.add_argument("--memory", action="store_true", help="peak memory per K for paper-sized victims")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="default: 1000 (CPU), 1000 1000 (CUDA)")
    p.add_argument("--candidates", type=int, default=200, help="candidates per run (m)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: kernel 5; end to end 600 CPU, 4000 CUDA)")
    p.add_argument("--runs", type=int, default=None, help="end to end: K runs (default 8 CPU, 64 CUDA)")
    p.add_argument("--runs-list", type=int, nargs="+", default=[1, 16, 64], help="kernel: K values to compare")
    p.add_argument("--epochs", type=int, default=None, help="victim epochs (default 20000, the classifier preset)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved measurement pairs")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--precision", default="32-true", help="trainer.precision for the stage (kernel: bf16-mixed = autocast)")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"])
    p.add_argument("--compile", default="false", choices=["auto", "true", "false"], help="reconstruct.compile, both sides")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-progress-bar", action="store_true", help="trainer.enable_progress_bar=false in the stages")
    p.add_argument("--memory-dims", type=int, nargs="+", default=[768, 1024])
    p.add_argument("--memory-runs", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.hidden = args.hidden or ([1000, 1000] if cuda or not args.end_to_end else [1000])
    torch.set_flush_denormal(True)  # as recon_lightning.fit does
    if args.memory:
        memory_main(args, device)
        return
    if not args.end_to_end:
        args.steps = args.steps or 5
        kernel_main(args, device)
        return
    args.steps = args.steps or (4000 if cuda else 600)
    args.runs = args.runs or (64 if cuda else 8)
    args.epochs = args.epochs or 20000
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "recon_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_MODE", "offline")
    print(hardware(device), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rec = reconstruct_pair(args, device, Path(tmp))
        vic = victim_pair(args, device, Path(tmp))
    print(f"end_to_end_ratio={rec['ratio']:.3f}")
    print(f"victim_ratio={vic['ratio']:.3f}")


if __name__ == "__main__":
    main()
