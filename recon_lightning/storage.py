"""Safe, atomic file I/O shared by every stage.

Every stage output is written to a temporary file and renamed into place, so a job killed
mid-write never leaves a half-written file that a later run would read as finished.
Tensors are stored as safetensors (no pickled code is ever executed on load); metadata as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BusyError, DataError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_GLOB = ".*.tmp"  # what atomic_path's temporary files look like


def remove_temp_files(directory: str | os.PathLike, recursive: bool = True) -> int:
    """Delete the temporary files a killed job left in ``directory`` (and below); returns how many."""
    removed = 0
    for tmp in (Path(directory).rglob if recursive else Path(directory).glob)(TEMP_GLOB):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs follow the umask like any other file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def load_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} is corrupt (not valid JSON): {path}: {err}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Save tensors (made contiguous, on CPU) with JSON metadata, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"meta": json.dumps(meta or {}, default=_jsonable)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, what: str = "tensor file") -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file written by :func:`save_tensors`; clear errors for missing/corrupt files."""
    meta = load_tensor_meta(path, what)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{what} is corrupt or not a safetensors file: {path}: {err}") from None
    return tensors, meta


def load_tensor_meta(path: str | os.PathLike, what: str = "tensor file") -> dict:
    """The JSON metadata of a file written by :func:`save_tensors`, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise DataError(f"{what} is corrupt or not a safetensors file: {path}: {err}") from None


def save_png(img: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a (C, H, W) uint8 tensor (C = 1 grey or 3 RGB) as PNG, atomically."""
    from PIL import Image

    arr = img.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def load_png(path: str | os.PathLike, channels: int = 3) -> torch.Tensor:
    """A PNG as a uint8 (C, H, W) tensor, converted to ``channels`` (1 = grey, 3 = RGB)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"corrupt or unreadable image: {path}: {err}") from None
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's contents (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-serialisable parts (used to detect config changes)."""
    text = json.dumps(parts, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (``flock`` on ``run_dir/.lock``) for the block; a second process
    gets :class:`BusyError`. The OS drops the lock when its holder exits, even after SIGKILL, so a crashed job
    never leaves a stale lock behind."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise BusyError(f"run_dir {run_dir} is in use by another job (pid {holder}); wait for it to end, "
                            f"or use another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
