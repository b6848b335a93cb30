"""List and prune the outputs a config change moved aside: ``python -m recon_lightning.stale RUN_DIR [--prune]``.

When a key that changes a stage's outputs changes, the stage's old folder is kept as
``RUN_DIR/<stage>.stale-<fingerprint>`` (see :mod:`recon_lightning.stages`), one per earlier config. This command lists
them (size, last change, stage) and, with ``--prune``, deletes them; it takes the run_dir's lock first, so it never
deletes while a job works in that run_dir.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ReconError
from .storage import run_dir_lock

STALE_MARK = ".stale-"


@dataclass
class StaleOutputs:
    path: Path
    stage: str
    fingerprint: str
    size: int  # bytes
    modified: float  # newest file's mtime (seconds since the epoch)


def stale_outputs(run_dir: str | Path) -> list[StaleOutputs]:
    """The ``<stage>.stale-<fingerprint>`` folders of ``run_dir``, oldest first."""
    found = []
    for path in Path(run_dir).glob(f"*{STALE_MARK}*"):
        if not path.is_dir():
            continue
        stage, _, fp = path.name.partition(STALE_MARK)
        files = [p for p in path.rglob("*") if p.is_file()]
        found.append(StaleOutputs(path, stage, fp, sum(p.stat().st_size for p in files),
                                  max((p.stat().st_mtime for p in files), default=path.stat().st_mtime)))
    return sorted(found, key=lambda s: s.modified)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon_lightning.stale", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prune", action="store_true", help="delete them (after taking the run_dir's lock)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: run_dir not found: {args.run_dir}", file=sys.stderr)
        return 2
    try:
        with run_dir_lock(args.run_dir) if args.prune else contextlib.nullcontext():
            found = stale_outputs(args.run_dir)
            for s in found:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.modified))
                print(f"{_human(s.size):>10}  {when}  {s.stage:<12} {s.path}")
                if args.prune:
                    shutil.rmtree(s.path)
    except ReconError as err:  # the run_dir is in use
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = _human(sum(s.size for s in found))
    if not found:
        print(f"no stale outputs in {args.run_dir}")
    else:
        print(f"{'deleted' if args.prune else 'found'} {len(found)} stale output folder(s), {total}"
              + ("" if args.prune else f"; delete them with: python -m recon_lightning.stale {args.run_dir} --prune"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
