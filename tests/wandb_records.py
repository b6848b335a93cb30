"""Read the records of an offline W&B run (``run-<id>.wandb``) without a W&B server, for tests.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
chunks (crc32, length, type FULL/FIRST/MIDDLE/LAST), each record a ``wandb_internal_pb2.Record``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, LAST = 1, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir: Path) -> dict[str, dict]:
    """``{display name: {"id", "group", "history": [{key: value}], "media": [file names]}}`` for every offline run."""
    runs = {}
    for run_file in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        info = {"id": None, "group": None, "history": [], "media": []}
        name = None
        for rec in records(run_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                name, info["id"], info["group"] = rec.run.display_name, rec.run.run_id, rec.run.run_group
            elif kind == "history":
                info["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        info["media"] = sorted(p.name for p in (run_file.parent / "files" / "media").rglob("*") if p.is_file())
        assert name not in runs, f"two W&B runs named {name}"
        runs[name] = info
    return runs


def logged_keys(run: dict) -> set[str]:
    return {key for row in run["history"] for key in row}
