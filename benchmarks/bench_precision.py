"""Precision and compilation options of the reconstruct stage, with evidence: speed, accuracy, recovery.

    python benchmarks/bench_precision.py                 # CPU here; on a CUDA machine the same command measures the GPU

For each option of the stage (``reconstruct.compile``, ``trainer.precision=bf16-mixed``, and on CUDA
``reconstruct.matmul_precision=high`` = TF32, alone and combined):

1. speed: candidate-steps/s of the stage's own optimisation step (``ReconstructionModule.optimization_steps``) on a
   default-sized victim (CPU: 64-1000-1, K=8, m=200; CUDA: 64-1000-1000-1, K=64, m=200), options measured in
   interleaved rounds so background load hits all alike; compilation time reported apart;
2. accuracy: the relative KKT loss and its gradient under the option against float64, on a small trained victim
   at random candidates and at the training set (where the loss is small: the regime that decides recovery);
3. recovery: the two recovery scenarios of tests/test_reconstruct.py (binary: 4 identifiable points; multiclass: 6
   points, 3 classes; victims trained to stationarity), 8 runs in a plain loop of the stage's step under the option,
   in float64 and float32 (bf16 autocast: float32 only), judged by the tests' own bars.

An option is worth a default only if it is faster *and* keeps 2 and 3; the printout ends with one verdict line each.
Takes ~5 min on 2 CPU cores (compilation included).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_reconstruct import hardware, sync  # noqa: E402

from recon_lightning import reconstruct as R  # noqa: E402
from recon_lightning.kkt import KKTObjective  # noqa: E402
from recon_lightning.matching import best_matches  # noqa: E402
from recon_lightning.victim import VictimMLP  # noqa: E402

F64 = torch.float64


@contextmanager
def option(device: torch.device, bf16: bool, matmul: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def options(device: torch.device) -> list[dict]:
    out = [{"name": "float32 (default)", "compile": False, "bf16": False, "matmul": "highest"},
           {"name": "compile", "compile": True, "bf16": False, "matmul": "highest"},
           {"name": "bf16-mixed", "compile": False, "bf16": True, "matmul": "highest"},
           {"name": "bf16-mixed + compile", "compile": True, "bf16": True, "matmul": "highest"}]
    if device.type == "cuda":
        out += [{"name": "TF32 (matmul high)", "compile": False, "bf16": False, "matmul": "high"},
                {"name": "TF32 + compile", "compile": True, "bf16": False, "matmul": "high"}]
    return out


# ----------------------------------------------------------------------------- 1. speed


def speed(args, device: torch.device, opts: list[dict]) -> dict[str, float]:
    torch.manual_seed(0)
    hidden = args.hidden or ([1000, 1000] if device.type == "cuda" else [1000])
    K = args.runs or (64 if device.type == "cuda" else 8)
    m, D = 200, 64
    victim = VictimMLP(D, hidden, 2, bias=[True] + [False] * len(hidden), center=True)
    spec = {"num_classes": 2, "weight_decay": 1e-3, "n_train": m // 2}
    rcfg = {"init_scale": [1e-3, 1e-1], "lr": [1e-3, 3e-2], "lambda_lr": None, "lambda_min": [0.0, 0.05],
            "alpha": [50.0, 300.0], "kkt_loss": "relative", "lambda_weight": 5.0, "prior_weight": 1.0, "box": [0.0, 1.0],
            "optimizer": "adam", "lambda_constraint": "project"}
    obj = KKTObjective(victim, spec, "binary_wd", "relu_sigmoid_grad", torch.float32, per_candidate=True).to(device)
    hps = [R.sample_hparams(rcfg, 0, r) for r in range(K)]
    mods = {}
    print(f"1. speed: victim {D}-{'-'.join(map(str, hidden))}-1, K={K} runs x {m} candidates, {args.steps} steps a round, "
          f"{args.rounds} interleaved rounds", flush=True)
    for o in opts:
        mod = R.ReconstructionModule(obj, list(range(K)), hps, R.candidate_labels(2, m // 2), D, {**rcfg, "compile": o["compile"]},
                                     "box", None, torch.float32, input_mean=victim.input_offset()).to(device)
        opt = mod.configure_optimizers()
        t = time.perf_counter()
        with option(device, o["bf16"], o["matmul"]):
            mod.optimization_steps(opt, 2)  # warm-up; compiles
        sync(device)
        mods[o["name"]] = (mod, opt, time.perf_counter() - t)
    rates: dict[str, list[float]] = {o["name"]: [] for o in opts}
    for r in range(args.rounds):
        for o in (opts if r % 2 == 0 else opts[::-1]):
            mod, opt, _ = mods[o["name"]]
            with option(device, o["bf16"], o["matmul"]):
                sync(device)
                t = time.perf_counter()
                mod.optimization_steps(opt, args.steps)
                sync(device)
            rates[o["name"]].append(K * m * args.steps / (time.perf_counter() - t))
    base = statistics.median(rates[opts[0]["name"]])
    out = {}
    for o in opts:
        rate = statistics.median(rates[o["name"]])
        out[o["name"]] = rate / base
        print(f"   {o['name']:24s} {rate:10.0f} candidate-steps/s  x{rate / base:.2f}  (first 2 steps incl. compilation "
              f"{mods[o['name']][2]:.1f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- 2. accuracy against float64


def accuracy(device: torch.device, opts: list[dict]) -> dict[str, dict]:
    from test_reconstruct import identifiable_points, train_to_stationarity

    D, H, wd = 10, 50, 1e-2
    x, y = identifiable_points(D, seed=0)
    torch.manual_seed(0)
    v = VictimMLP(D, [H], 2, bias=False, init_scale=[0.1, 0.1]).double()
    torch.set_flush_denormal(True)
    train_to_stationarity(v, x, y, wd)
    spec = {"weight_decay": wd, "n_train": 4}
    lam_true = torch.sigmoid(-(2 * y - 1) * v(x)).detach()
    g = torch.Generator().manual_seed(1)
    K, m = 8, 4
    # random candidates, and the training set itself and slightly perturbed (the smallest losses)
    xs = torch.cat([torch.randn(K // 2, m, D, generator=g, dtype=F64) * 0.3,
                    x.expand(K // 2, -1, -1) + torch.randn(K // 2, m, D, generator=g, dtype=F64)
                    * torch.tensor([0.0, 1e-5, 1e-3, 1e-2], dtype=F64).view(-1, 1, 1)])
    lams = torch.cat([torch.rand(K // 2, m, generator=g, dtype=F64), lam_true.expand(K // 2, -1)])
    ys = y.expand(K, -1)
    alpha = torch.full((K,), 5000.0, dtype=F64)  # sigmoid(alpha h) ~ the exact ReLU derivative: the converged regime

    def evaluate(dtype, o):
        obj = KKTObjective(v, spec, "binary_wd", "relu_sigmoid_grad", dtype).to(device)
        xx = xs.to(device, dtype).requires_grad_()
        with option(device, o["bf16"], o["matmul"]):
            fn = obj.kkt
            if o["compile"]:
                fn = torch.compile(obj.kkt, dynamic=False)
            _, rel = fn(xx, lams.to(device, dtype), ys.to(device), alpha.to(device, dtype))
            (gx,) = torch.autograd.grad(rel.sum(), [xx])
        return rel.detach().double().cpu(), gx.double().cpu()

    ref_rel, ref_g = evaluate(F64, {"bf16": False, "matmul": "highest", "compile": False})
    print(f"2. accuracy against float64 (trained 10-50-1 victim; relative KKT loss from {ref_rel.min():.1e} to "
          f"{ref_rel.max():.1e}):", flush=True)
    out = {}
    for o in opts:
        rel, gx = evaluate(torch.float32, o)
        err = ((rel - ref_rel).abs() / ref_rel.abs()).max().item()
        cos = torch.nn.functional.cosine_similarity(gx.flatten(1), ref_g.flatten(1), dim=1)
        # the training-set rows: where small losses must be resolved
        err_small = ((rel - ref_rel).abs() / ref_rel.abs())[K // 2:].max().item()
        out[o["name"]] = {"loss_rel_err": err, "loss_rel_err_near_solution": err_small, "grad_cos_min": cos.min().item()}
        print(f"   {o['name']:24s} loss relative error max {err:9.2e} (near the training set {err_small:9.2e}); "
              f"gradient cosine to float64 min {cos.min().item():.6f}", flush=True)
    return out


# ----------------------------------------------------------------------------- 3. recovery


def _binary_scenario():
    """tests/test_reconstruct.py::test_reconstruction_recovers_training_points: 4 identifiable points, a 10-50-1
    victim trained to stationarity with weight decay; pass: every training point has a candidate at cosine > 0.95."""
    from test_reconstruct import identifiable_points, train_to_stationarity

    D, H, wd = 10, 50, 1e-2
    x, y = identifiable_points(D, seed=0)
    torch.manual_seed(0)
    v = VictimMLP(D, [H], 2, bias=False, init_scale=[0.1, 0.1]).double()
    train_to_stationarity(v, x, y, wd)
    rcfg = {"init_scale": [1e-3, 1e-1], "lr": 0.1, "lambda_lr": None, "lambda_min": [0.01, 0.1], "alpha": [50.0, 300.0],
            "kkt_loss": "relative", "lambda_weight": 1.0, "prior_weight": 1.0, "box": [0.0, 1.0], "optimizer": "adam",
            "lambda_constraint": "penalty"}
    return {"victim": v, "spec": {"weight_decay": wd, "n_train": 4}, "form": "binary_wd", "x": x, "y_cand": R.candidate_labels(2, 4),
            "other": identifiable_points(D, seed=1)[0], "rcfg": rcfg, "prior": "sphere", "mean_norm": 1.0, "multipliers": "runner_up",
            "per_candidate": False, "steps": 2000, "passes": lambda best: bool(best.min() > 0.95)}


def _multiclass_scenario():
    """tests/test_reconstruct.py::test_stage_recovers_the_training_set_of_a_multiclass_victim, the stage's run as a plain
    loop: 6 points, 3 classes, CE + weight decay, 10-60-3 victim; pass: all > 0.9 and at least 5 of 6 > 0.95."""
    from test_reconstruct import multiclass_points, train_to_stationarity

    D, H, wd = 10, 60, 1e-2
    x, y, other = multiclass_points(D)
    torch.manual_seed(0)
    v = VictimMLP(D, [H], 3, bias=False, init_scale=[0.1, 0.1]).double()
    train_to_stationarity(v, x, y, wd)
    v = v.float().double()  # the test saves the victim in float32 and the stage loads it from there
    rcfg = {"init_scale": [1e-3, 1e-1], "lr": [0.003, 0.03], "lambda_lr": None, "lambda_min": 0.0, "alpha": [50.0, 300.0],
            "kkt_loss": "relative", "lambda_weight": 5.0, "prior_weight": 1.0, "box": [0.0, 1.0], "optimizer": "adam",
            "lambda_constraint": "project"}
    return {"victim": v, "spec": {"weight_decay": wd, "n_train": 6}, "form": "multiclass_wd", "x": x, "y_cand": R.candidate_labels(3, 2),
            "other": other, "rcfg": rcfg, "prior": "none", "mean_norm": None, "multipliers": "all", "per_candidate": True,
            "steps": 3000, "passes": lambda best: bool(best.min() > 0.9 and int((best > 0.95).sum()) >= 5)}


def recovery(device: torch.device, opts: list[dict]) -> dict[str, float]:
    """Each scenario under each option (float64 and float32; bf16 autocast: float32 only). Returns the worst training
    point's best cosine per "<option> <scenario> <dtype>"."""
    out: dict[str, float] = {}  # worst training point's best cosine per option, scenario and dtype
    torch.set_flush_denormal(True)
    for scen_name, make in (("binary", _binary_scenario), ("multiclass", _multiclass_scenario)):
        sc = make()
        D = sc["x"].shape[1]
        print(f"3. recovery, {scen_name} ({(make.__doc__ or '').split(';')[0].strip()}; 8 runs x {sc['steps']} steps):",
              flush=True)
        runs = list(range(8))
        for o, dtype in [(o, dt) for o in opts for dt in ((torch.float32,) if o["bf16"] else (F64, torch.float32))]:
            obj = KKTObjective(sc["victim"], sc["spec"], sc["form"], "relu_sigmoid_grad", dtype, multipliers=sc["multipliers"],
                               per_candidate=sc["per_candidate"]).to(device)
            mod = R.ReconstructionModule(obj, runs, [R.sample_hparams(sc["rcfg"], 0, r) for r in runs], sc["y_cand"], D,
                                         {**sc["rcfg"], "compile": o["compile"]}, sc["prior"], sc["mean_norm"], dtype).to(device)
            opt = mod.configure_optimizers()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny tensors
            try:
                with option(device, o["bf16"], o["matmul"]):
                    mod.optimization_steps(opt, sc["steps"])
            finally:
                torch.set_num_threads(threads)
            cands = mod.x().detach().double().cpu()[mod.active.cpu()].reshape(-1, D)
            best = best_matches("cosine", sc["x"], cands)["best_score"]
            ctrl = best_matches("cosine", sc["other"], cands)["best_score"].max().item()
            rel = mod.losses(create_graph=False)["kkt_rel"].detach().double().cpu()
            ok = sc["passes"](best) and ctrl < 0.9
            out[f"{o['name']} {scen_name} {str(dtype)[6:]}"] = best.min().item() if ok else -best.min().item()
            print(f"   {o['name']:24s} {str(dtype)[6:]:8s} training points' best cosines {' '.join(f'{c:.3f}' for c in best.tolist())}, "
                  f"control {ctrl:.3f}, median relative KKT loss {rel.median():.2e}: {'PASS' if ok else 'FAIL'}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="speed: steps a round (default 20 CPU, 200 CUDA)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "accuracy", "recovery"])
    p.add_argument("--only", default=None, help="comma-separated option names to measure (the first is the baseline), "
                   "e.g. 'float32 (default),TF32 (matmul high)'")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.steps = args.steps or (200 if device.type == "cuda" else 20)
    torch.set_flush_denormal(True)
    print(hardware(device), flush=True)
    opts = options(device)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in {o["name"] for o in opts}]
        if unknown:
            p.error(f"--only: unknown option(s) {unknown}; known on {device.type}: {[o['name'] for o in opts]}")
        opts = [next(o for o in opts if o["name"] == n) for n in names]
    sp = speed(args, device, opts) if "speed" not in args.skip else {}
    acc = accuracy(device, opts) if "accuracy" not in args.skip else {}
    rec = recovery(device, opts) if "recovery" not in args.skip else {}
    print("verdicts (keeps the results: loss error at most 2x float32's near the solution, and every recovery scenario "
          "that float32 eager passes passes):")
    base_err = acc.get(opts[0]["name"], {}).get("loss_rel_err_near_solution", math.nan)
    for o in opts[1:]:
        name = o["name"]
        accurate = acc.get(name, {}).get("loss_rel_err_near_solution", math.inf) <= 2 * base_err
        lost = [key[len(name) + 1:] for key, score in rec.items() if key.startswith(name + " ") and score < 0
                and rec.get(f"{opts[0]['name']} {key[len(name) + 1:]}", -1.0) > 0]
        keeps = accurate and not lost
        print(f"   {name:24s} speed x{sp.get(name, math.nan):.2f}; loss accuracy kept: {accurate}; recovery lost: "
              f"{', '.join(lost) or 'none'} -> {'keeps the results' if keeps else 'changes the results: off by default'}")

if __name__ == "__main__":
    main()
