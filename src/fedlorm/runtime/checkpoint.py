"""Run checkpoints: the state after the last completed step, written atomically, read back to resume.

A checkpoint is two files in the run's output directory:

- ``checkpoint-<id>.safetensors``: the tensors (server state, RNG states), under a name used once;
- ``checkpoint.json``: the commit record (everything else, JSON) naming that tensor file and its size.

Both are written to a temporary file first, flushed to disk and renamed with ``os.replace``: the
tensor file first, the record second, and only then is the previous tensor file deleted. A process
killed at any instant therefore leaves the previous complete checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlorm import __version__

__all__ = [
    "CHECKPOINT_RECORD",
    "Checkpoint",
    "CheckpointError",
    "find_checkpoint",
    "load_checkpoint",
    "load_record",
    "remove_checkpoint",
    "restore_rng",
    "rng_tensors",
    "save_checkpoint",
]

CHECKPOINT_RECORD = "checkpoint.json"
_FORMAT = 1
_TENSOR_GLOB = "checkpoint-*.safetensors"
_TMP_GLOB = ".checkpoint*.tmp"

Hook = Callable[[str], None]
"""Called with "tensors" / "record" after a temporary file is written and before its rename (tests)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the run; one line for the user."""


@dataclass
class Checkpoint:
    """One saved run state: a JSON-compatible record and named CPU tensors."""

    record: dict[str, Any]
    tensors: dict[str, Tensor]


def find_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The commit record in ``out_dir``, or None when the directory holds no checkpoint."""
    path = Path(out_dir) / CHECKPOINT_RECORD
    return path if path.is_file() else None


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    record: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    hook: Hook | None = None,
) -> Path:
    """Write ``tensors`` then ``record`` atomically as the directory's checkpoint; return the record path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{uuid.uuid4().hex[:12]}.safetensors"
    tmp = out / f".{name}.tmp"
    try:
        save_file(_storable(tensors), str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; results files honour the umask
        _fsync(tmp)
        if hook is not None:
            hook("tensors")
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    full = {
        "format": _FORMAT,
        "fedlorm": __version__,
        **record,
        "tensors": name,
        "tensors_bytes": (out / name).stat().st_size,
    }
    path = out / CHECKPOINT_RECORD
    _write_text_atomic(path, json.dumps(full, indent=1) + "\n", hook)
    _fsync_dir(out)  # the renames survive a power loss too, not only a killed process
    for stale in [*out.glob(_TENSOR_GLOB), *out.glob(_TMP_GLOB)]:
        if stale.name != name:  # earlier checkpoints, and temporary files of an interrupted save
            stale.unlink(missing_ok=True)
    return path


def load_record(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON commit record of the directory's checkpoint (no tensors read)."""
    out = Path(out_dir)
    path = find_checkpoint(out)
    if path is None:
        raise CheckpointError(f"{str(out)!r} holds no {CHECKPOINT_RECORD}: nothing to resume there")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is not readable JSON: {_line(err)}") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT or "tensors" not in record:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {found!r}; this fedlorm reads format {_FORMAT}"
        )
    return record


def load_checkpoint(out_dir: str | os.PathLike[str]) -> Checkpoint:
    """Read the directory's checkpoint; :class:`CheckpointError` names what is wrong with it."""
    out = Path(out_dir)
    record = load_record(out)
    tensor_path = out / str(record["tensors"])
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint tensors {str(tensor_path)!r} are missing")
    size = tensor_path.stat().st_size
    if size != record.get("tensors_bytes"):
        raise CheckpointError(
            f"checkpoint tensors {str(tensor_path)!r} have {size} bytes, the record says "
            f"{record.get('tensors_bytes')} (truncated or replaced)"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint tensors {str(tensor_path)!r} are unreadable: {_line(err)}"
        ) from None
    return Checkpoint(record=record, tensors=tensors)


def remove_checkpoint(out_dir: str | os.PathLike[str]) -> None:
    """Delete the directory's checkpoint files (the record first, so no half checkpoint remains)."""
    out = Path(out_dir)
    (out / CHECKPOINT_RECORD).unlink(missing_ok=True)
    for path in out.glob(_TENSOR_GLOB):
        path.unlink(missing_ok=True)
    for path in out.glob(_TMP_GLOB):
        path.unlink(missing_ok=True)


def rng_tensors(server_rng: torch.Generator) -> dict[str, Tensor]:
    """RNG states a resumed run must continue from: the global torch RNG(s) and the server's."""
    out = {"rng.torch": torch.get_rng_state(), "rng.server": server_rng.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    return out


def restore_rng(tensors: Mapping[str, Tensor], server_rng: torch.Generator) -> None:
    """Inverse of :func:`rng_tensors` (CUDA states only where the same devices exist)."""
    torch.set_rng_state(tensors["rng.torch"])
    server_rng.set_state(tensors["rng.server"])
    keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in keys]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def _storable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, copied where two names share storage (safetensors refuses aliases)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str, hook: Hook | None) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if hook is not None:
            hook("record")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__
