"""Offline sweep runner: ``python -m recon_lightning.sweep sweeps/reconstruct.yaml --count N [-- key=value ...]``.

Samples configurations from a W&B sweep file locally (no W&B server) and runs the sweep's own
``command`` for each, as a W&B agent would. Every configuration gets its own run directory
``<run_dir>/sweeps/<sweep name>/trial_XXX`` and reuses the victim (``<run_dir>/classifier``) and
the training embeddings (for scoring) of the base ``run_dir``, which must exist already.
Each trial's result (parameters, summary, metric) is written to ``trial_XXX/result.json`` when it
ends, and ``<run_dir>/sweeps/<sweep name>/results.jsonl`` lists every trial's latest result.
``--shard I/N`` runs only trials ``i % N == I``, so N processes (a SLURM job array with no W&B
server) share one sweep; each process rewrites ``results.jsonl`` from the result files when it ends.

A trial's ``status``: ``ok``; ``diverged`` (every reconstruction run of the trial failed, e.g. a learning rate at the
top of the sampled range: a result of the sweep, with the runs' reasons); or ``failed`` (the trial could not run:
refused, crashed or killed). The runner exits 0 when all its trials are ok or diverged, as a finished sweep on a
scheduler must (``--dependency=afterok``), 1 when a trial failed, and 2 when it could not start (no victim, a bad
sweep file). Resuming keeps the ok and diverged trials and reruns the failed ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from .errors import ConfigError, ReconError
from .storage import atomic_path, load_json, load_tensor_meta, save_json


def sample_value(name: str, spec: dict, rng: np.random.Generator):
    """One value of a W&B sweep parameter (the distributions W&B's random search uses)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][int(rng.integers(len(spec["values"])))]
    dist = spec.get("distribution", "uniform" if isinstance(spec.get("min"), float) else "int_uniform")
    lo, hi = spec.get("min"), spec.get("max")
    if lo is None or hi is None:
        raise ConfigError(f"sweep parameter {name}: distribution {dist} needs min and max")
    if dist == "uniform":
        return float(rng.uniform(lo, hi))
    if dist == "int_uniform":
        return int(rng.integers(int(lo), int(hi) + 1))
    if dist == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if dist == "log_uniform":  # W&B: min/max are natural logs
        return float(math.exp(rng.uniform(lo, hi)))
    if dist == "q_uniform":
        q = spec.get("q", 1)
        return float(round(rng.uniform(lo, hi) / q) * q)
    raise ConfigError(f"sweep parameter {name}: distribution {dist!r} is not supported offline")


def configurations(sweep: dict, count: int, seed: int) -> list[dict]:
    method = sweep.get("method", "random")
    params = sweep.get("parameters") or {}
    if method == "grid":
        names = list(params)
        choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
        grid = [dict(zip(names, combo)) for combo in itertools.product(*choices)]
        return grid[:count]
    if method != "random":
        raise ConfigError(f"offline sweeps support method random or grid, not {method!r} (use a W&B server for bayes)")
    rng = np.random.default_rng(seed)
    return [{name: sample_value(name, spec, rng) for name, spec in params.items()} for _ in range(count)]


def expand_command(sweep: dict, params: dict) -> list[str]:
    """The sweep's ``command`` with W&B's macros filled in."""
    command = sweep.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    args_nh = [f"{k}={_fmt(v)}" for k, v in params.items()]
    out: list[str] = []
    for part in command:
        if part == "${env}":
            if os.name != "nt":
                out.append("/usr/bin/env")
        elif part == "${interpreter}":
            out.append(sys.executable)
        elif part == "${program}":
            out.append(str(sweep.get("program", "")))
        elif part == "${args_no_hyphens}":
            out.extend(args_nh)
        elif part == "${args}":
            out.extend(f"--{a}" for a in args_nh)
        elif part == "${args_json}":
            out.append(json.dumps(params))
        else:
            out.append(part)
    return out


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="W&B sweep YAML file")
    parser.add_argument("--count", type=int, default=4, help="number of configurations to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the configuration sampler")
    parser.add_argument("--run-dir", default=None, help="base run dir holding classifier/ and embed/ (default: the config's run_dir)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("--shard", default="0/1", help="I/N: run only trials i with i %% N == I (e.g. a SLURM array task)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides for every configuration go after "--" (or anywhere, as bare key=value words)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    extra = [a for a in argv if "=" in a and not a.startswith("-")] + extra
    args = parser.parse_args([a for a in argv if not ("=" in a and not a.startswith("-"))])
    args.overrides = extra
    try:
        return _run(args)
    except ReconError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, total = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 3/32), got {text!r}") from None
    if total < 1 or not 0 <= index < total:
        raise ConfigError(f"--shard {text}: need 0 <= I < N")
    return index, total


def trial_results(out_dir: Path) -> dict[int, dict]:
    """Every trial's latest result (``trial_XXX/result.json``, written atomically when it ended), by index."""
    rows = {}
    for path in sorted(out_dir.glob("trial_*/result.json")):
        try:
            row = load_json(path, what="trial result")
        except ReconError:  # unreadable: treated as not run
            continue
        rows[int(row["trial"])] = row
    return rows


def write_results(out_dir: Path) -> list[dict]:
    """``results.jsonl``: one line per trial, in trial order, rebuilt from the result files.

    Shards rewrite it concurrently: a shard may rename an older view over a newer one, so each checks
    the result files again after its rename and rewrites until what it wrote is current. The last
    process to rename therefore leaves every trial in the file."""
    rows = [row for _, row in sorted(trial_results(out_dir).items())]
    while True:
        with atomic_path(out_dir / "results.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        current = [row for _, row in sorted(trial_results(out_dir).items())]
        if current == rows:
            return rows
        rows = current


FINISHED = ("ok", "diverged")  # trial statuses that are results (kept when the sweep resumes)


def trial_status(trial: Path, returncode: int) -> tuple[str, str | None]:
    """``(status, reason)`` of a trial that ended with ``returncode`` (see the module docstring): ``diverged`` when it
    stopped with the pipeline's error code (2) and every run file it wrote records a failed run."""
    if returncode == 0:
        return "ok", None
    if returncode == 2:
        from .reconstruct import runs_dir  # (imports Lightning: only for failed trials)

        try:
            runs = [load_tensor_meta(path) for path in sorted(runs_dir(trial).glob("run_*.safetensors"))]
        except ReconError:
            runs = []
        if runs and all(run.get("status") == "failed" for run in runs):
            errors = sorted({str(run.get("error")) for run in runs})
            return "diverged", f"all {len(runs)} run(s) failed: " + "; ".join(errors[:3])
    return "failed", f"exit code {returncode} (the trial's output, and its fit.log, say why)"


def _run(args) -> int:
    path = Path(args.sweep)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict) or "parameters" not in sweep:
        raise ConfigError(f"{path} is not a W&B sweep file (no 'parameters')")
    if args.run_dir is None:
        from .fit import load_config

        args.run_dir = load_config(args.overrides).run_dir
    base = Path(args.run_dir).expanduser().resolve()
    if not (base / "classifier" / "victim.json").is_file():
        raise ConfigError(f"no victim in {base / 'classifier'}: run `python -m recon_lightning.fit stage=classifier` first")
    out_dir = base / "sweeps" / path.stem
    metric = (sweep.get("metric") or {}).get("name", "recon_score")
    goal = (sweep.get("metric") or {}).get("goal", "maximize")
    shard, shards = parse_shard(args.shard)
    finished = trial_results(out_dir)
    for i, params in enumerate(configurations(sweep, args.count, args.seed)):
        if i % shards != shard:
            continue  # another shard's trial
        trial = out_dir / f"trial_{i:03d}"
        cmd = expand_command(sweep, params) + [
            f"run_dir={trial}", f"reconstruct.victim_dir={base / 'classifier'}", f"reconstruct.embeddings_dir={base}",
            *args.overrides,
        ]
        earlier = finished.get(i)
        if (earlier is not None and _status(earlier) in FINISHED and earlier["params"] == params
                and earlier.get("command") == cmd):
            # Resuming a sweep: a trial that finished before is kept, not rerun or recorded twice.
            print(f"[{i + 1}/{args.count}] finished earlier ({_status(earlier)}): {metric} = {earlier['metric']}", flush=True)
            continue
        print(f"[{i + 1}/{args.count}] {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        proc = subprocess.run(cmd)
        done = trial / "reconstruct" / "DONE.json"
        summary = load_json(done).get("summary", {}) if proc.returncode == 0 and done.is_file() else {}
        status, reason = trial_status(trial, proc.returncode)
        if reason:
            print(f"[{i + 1}/{args.count}] {status}: {reason}", flush=True)
        save_json(trial / "result.json", {"trial": i, "params": params, "returncode": proc.returncode, "status": status,
                                          "reason": reason, "metric": summary.get(metric), "summary": summary,
                                          "command": cmd})
    if args.dry_run:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    results = write_results(out_dir)
    scored = [r for r in results if r["metric"] is not None]
    if scored:
        best = (max if goal == "maximize" else min)(scored, key=lambda r: r["metric"])
        print(f"best {metric} = {best['metric']:.4f} (trial {best['trial']}): {best['params']}")
    elif results:
        print(f"no trial reported {metric} (is there a training set in {base / 'embed'}?)")
    # Every trial this process ran wrote its result.json, so its shard's rows tell whether its work is done:
    # diverged trials are results; a failed one means the sweep could not do its work.
    mine = [r for r in results if r["trial"] % shards == shard and r["trial"] < args.count]
    counts = {status: sum(_status(r) == status for r in mine) for status in ("ok", "diverged", "failed")}
    print(f"shard {shard}/{shards}: {len(mine)} trial(s): " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return 1 if counts["failed"] else 0


def _status(row: dict) -> str:
    """A result's status (results written before statuses existed: from the return code)."""
    return row.get("status") or ("ok" if row["returncode"] == 0 else "failed")


if __name__ == "__main__":
    sys.exit(main())
