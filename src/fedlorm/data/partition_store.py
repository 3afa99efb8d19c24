"""Per-node data on disk: one participant's share of every task in a folder of its own.

``fedlorm partition`` writes, for a run of K clients and T tasks::

    DIR/client-0/manifest.json   task-0.safetensors ... task-{T-1}.safetensors
    ...
    DIR/client-{K-1}/...
    DIR/server/...               (the evaluation set: test split, or the validation split)

Each ``task-T.safetensors`` holds ``images`` (uint8, N×C×H×W, as the run keeps them in memory) and
``labels`` (int64, N, class *positions* in the run's class order, inside task T's block).
``manifest.json`` says whose folder it is, how the classes split into tasks, their names, and a
fingerprint of the config fields that decided the data, so a folder from another run or of another
client is refused. docs/partitions.md describes the format for users who bring their own data.

This module knows only the format. Which config wrote a folder is the caller's business
(:mod:`fedlorm.runtime.partitions`): it passes those fields as a plain mapping. Every problem with a
folder is a ValueError whose one-line message names the folder and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SERVER",
    "VERSION",
    "Participant",
    "StoredPartition",
    "TaskData",
    "check_output",
    "config_fingerprint",
    "folder_name",
    "make_manifest",
    "read_partition",
    "task_file",
    "write_partitions",
]

FORMAT = "fedlorm-partition"
VERSION = 1
MANIFEST = "manifest.json"
SERVER = "server"
_TMP_PREFIX = ".partition-"
_OURS = re.compile(r"client-\d+|server")

Participant = int | str  # a client index, or SERVER
TaskData = tuple[Tensor, Tensor]  # (images uint8 N×C×H×W, labels int64 N)


def folder_name(who: Participant) -> str:
    """``client-K`` or ``server``."""
    return SERVER if who == SERVER else f"client-{int(who)}"


def task_file(task: int) -> str:
    """``task-T.safetensors`` (T from 0, as ``Experiment.client_data(task)`` counts)."""
    return f"task-{task}.safetensors"


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the config fields that decide a folder's data, in canonical JSON."""
    text = json.dumps(dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StoredPartition:
    """A checked folder: its manifest's facts and, per task, ``(images, labels)``."""

    path: Path
    client: Participant
    num_clients: int
    split: str
    class_order: tuple[int, ...]
    task_classes: tuple[range, ...]
    class_names: tuple[str, ...]
    fingerprint: str | None
    tasks: tuple[TaskData, ...]

    @property
    def task_sizes(self) -> tuple[int, ...]:
        return tuple(len(classes) for classes in self.task_classes)


def make_manifest(
    who: Participant,
    *,
    num_clients: int,
    split: str,
    class_order: Sequence[int],
    task_classes: Sequence[range],
    class_names: Sequence[str],
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A folder's manifest without its ``tasks`` list (:func:`write_partitions` adds it)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "client": who,
        "num_clients": int(num_clients),
        "num_tasks": len(task_classes),
        "split": split,
        "class_order": [int(c) for c in class_order],
        "task_classes": [[r.start, r.stop] for r in task_classes],
        "class_names": list(class_names),
        "fingerprint": None if config is None else config_fingerprint(config),
        "config": None if config is None else dict(config),
    }


# -- writing ---------------------------------------------------------------------------------------
def write_partitions(
    out: str | os.PathLike[str],
    folders: Iterable[tuple[dict[str, Any], Sequence[TaskData]]],
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write each ``(manifest, per-task data)`` as ``out/client-K`` or ``out/server``; their paths.

    Everything is written into a temporary folder inside ``out`` first and renamed into place only
    when every folder is complete, so a failure leaves ``out`` as it was. A non-empty ``out`` is an
    error unless ``overwrite``; then its ``client-*`` and ``server`` folders are replaced (other
    entries stay).
    """
    out = Path(out)
    check_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=out))
    try:
        names = []
        for manifest, tasks in folders:
            name = folder_name(manifest["client"])
            _write_folder(tmp / name, manifest, tasks)
            names.append(name)
        for entry in out.iterdir():
            if entry != tmp and (_OURS.fullmatch(entry.name) or entry.name.startswith(_TMP_PREFIX)):
                _remove(entry)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in names]


def check_output(out: str | os.PathLike[str], overwrite: bool) -> None:
    """ValueError unless ``out`` is absent, an empty folder, or a folder and ``overwrite`` is set."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    entries = sorted(entry.name for entry in out.iterdir())
    if entries and not overwrite:
        raise ValueError(
            f"--out {str(out)!r} is not empty ({', '.join(entries[:3])}"
            f"{', …' if len(entries) > 3 else ''}); pass --overwrite to replace its partition "
            "folders or choose another --out"
        )


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _write_folder(path: Path, manifest: Mapping[str, Any], tasks: Sequence[TaskData]) -> None:
    path.mkdir()
    entries = []
    for task, (images, labels) in enumerate(tasks):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"task {task}: images must be uint8 (N, C, H, W), got {images.dtype}")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"task {task}: labels must be int64 of shape ({images.shape[0]},)")
        blob = save_safetensors({"images": images.contiguous(), "labels": labels.contiguous()})
        (path / task_file(task)).write_bytes(blob)
        entries.append(
            {"file": task_file(task), "samples": len(labels), "sha256": hashlib.sha256(blob).hexdigest()}
        )
    # One line per key: readable, and a 200-class list stays one line.
    lines = [
        f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}"
        for key, value in {**manifest, "tasks": entries}.items()
    ]
    (path / MANIFEST).write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


# -- reading ---------------------------------------------------------------------------------------
def read_partition(
    path: str | os.PathLike[str], who: Participant, *, config: Mapping[str, Any] | None = None
) -> StoredPartition:
    """The checked folder of ``who`` (a client index or ``"server"``).

    With ``config`` (the fields :func:`config_fingerprint` hashes), a folder whose manifest carries
    another fingerprint is refused; a manifest with ``"fingerprint": null`` (a folder made by hand)
    is checked for structure only. ValueError, one line naming the folder, for a folder that is
    missing, empty, of another run or participant, or whose manifest or files cannot be read.
    """
    path = Path(path)

    def fail(problem: str) -> ValueError:
        return ValueError(f"partition folder {str(path)!r} {problem}")

    if not path.exists():
        raise fail("does not exist")
    if not path.is_dir():
        raise fail("is not a directory")
    try:
        entries = sorted(entry.name for entry in path.iterdir())
    except OSError as err:
        raise fail(f"cannot be read: {err.strerror or err}") from None
    if not entries:
        raise fail("is empty; write it with `fedlorm partition` (see docs/partitions.md)")
    if MANIFEST not in entries:
        inside = next((e for e in entries if _OURS.fullmatch(e)), None)
        hint = f" (it holds {inside}/: give the participant's own folder)" if inside else ""
        raise fail(f"has no {MANIFEST}{hint}")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fail(f"has an unreadable {MANIFEST}: {_one_line(err)}") from None
    facts = _parse_manifest(manifest, fail)
    written = facts["fingerprint"]
    if config is not None and written is not None and written != config_fingerprint(config):
        raise fail(f"was written for another run ({_config_difference(manifest.get('config'), config)})")
    if facts["client"] != who:
        raise fail(f"holds the data of {_describe(facts['client'])}, not of {_describe(who)}")
    tasks = tuple(
        _read_task(path, entry, classes, fail)
        for entry, classes in zip(manifest["tasks"], facts["task_classes"], strict=True)
    )
    return StoredPartition(path=path, tasks=tasks, **facts)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _describe(who: Participant) -> str:
    return "the server" if who == SERVER else f"client {who}"


def _config_difference(written: Any, expected: Mapping[str, Any]) -> str:
    if not isinstance(written, Mapping):
        return "its fingerprint differs from this run's"
    differ = [
        f"{key} = {json.dumps(written.get(key))} there, {json.dumps(expected.get(key))} here"
        for key in sorted(set(written) | set(expected))
        if written.get(key) != expected.get(key)
    ]
    return "; ".join(differ) if differ else "its fingerprint differs from this run's"


def _parse_manifest(manifest: Any, fail: Callable[[str], ValueError]) -> dict[str, Any]:
    """The manifest's facts as StoredPartition fields (all but path and tasks), checked."""

    def bad(what: str) -> ValueError:
        return fail(f"has a malformed {MANIFEST}: {what}")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("format") != FORMAT:
        raise bad(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
    version = manifest.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise fail(
            f"has format version {version!r}; this fedlorm reads version {VERSION}"
            + (" (update fedlorm)" if newer else "")
        )

    def integer(key: str, low: int) -> int:
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise bad(f"{key} = {value!r} is not an integer >= {low}")
        return value

    num_clients = integer("num_clients", 1)
    num_tasks = integer("num_tasks", 1)
    client = manifest.get("client")
    if client != SERVER and not (
        isinstance(client, int) and not isinstance(client, bool) and 0 <= client < num_clients
    ):
        raise bad(f"client = {client!r} is neither {SERVER!r} nor an integer in 0..{num_clients - 1}")
    order = manifest.get("class_order")
    if not isinstance(order, list) or not all(isinstance(c, int) and c >= 0 for c in order):
        raise bad("class_order is not a list of class ids (integers >= 0)")
    if len(set(order)) != len(order):
        raise bad("class_order repeats a class id")
    names = manifest.get("class_names")
    if not isinstance(names, list) or len(names) != len(order) or not all(isinstance(n, str) for n in names):
        raise bad(f"class_names is not a list of {len(order)} strings (one per class in class_order)")
    spans = manifest.get("task_classes")
    ok = isinstance(spans, list) and len(spans) == num_tasks
    ok = ok and all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in spans)
    ranges = [range(s[0], s[1]) for s in spans] if ok else []
    stops = [0, *(r.stop for r in ranges)]
    if not ok or any(r.start != stop or len(r) < 1 for r, stop in zip(ranges, stops, strict=False)):
        raise bad(f"task_classes is not {num_tasks} consecutive [start, stop) ranges from 0")
    if stops[-1] != len(order):
        raise bad(f"task_classes end at {stops[-1]}, but class_order has {len(order)} classes")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or len(tasks) != num_tasks or not all(isinstance(t, dict) for t in tasks):
        raise bad(f"tasks is not a list of {num_tasks} objects")
    fingerprint = manifest.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise bad("fingerprint is neither a string nor null")
    split = manifest.get("split", "")
    return {
        "client": client,
        "num_clients": num_clients,
        "split": split if isinstance(split, str) else "",
        "class_order": tuple(order),
        "task_classes": tuple(ranges),
        "class_names": tuple(names),
        "fingerprint": fingerprint,
    }


def _read_task(
    path: Path, entry: Mapping[str, Any], classes: range, fail: Callable[[str], ValueError]
) -> TaskData:
    name = entry.get("file")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise fail(f"has a malformed {MANIFEST}: task file {name!r} is not a file name")
    try:
        blob = (path / name).read_bytes()
    except FileNotFoundError:
        raise fail(f"is missing {name}") from None
    except OSError as err:
        raise fail(f"cannot read {name}: {err.strerror or err}") from None
    digest = entry.get("sha256")
    if digest is not None and hashlib.sha256(blob).hexdigest() != digest:
        raise fail(f"has a corrupted {name} (its SHA-256 differs from the one in {MANIFEST})")
    try:
        tensors = load_safetensors(blob)
    except Exception as err:  # safetensors raises its own SafetensorError and others
        raise fail(f"has an unreadable {name}: {_one_line(err)}") from None
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None:
        raise fail(f"has a {name} without 'images' and 'labels' (it holds {sorted(tensors)})")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise fail(f"has a {name} whose images are not uint8 (N, 1 or 3, H, W): {images.dtype} "
                   f"{tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise fail(f"has a {name} whose labels are not int64 of shape ({images.shape[0]},): "
                   f"{labels.dtype} {tuple(labels.shape)}")
    samples = entry.get("samples")
    if samples is not None and samples != len(labels):
        raise fail(f"has a {name} of {len(labels)} samples, but {MANIFEST} says {samples}")
    if len(labels) and not classes.start <= int(labels.min()) <= int(labels.max()) < classes.stop:
        raise fail(f"has a {name} with labels outside its task's class positions "
                   f"{classes.start}..{classes.stop - 1}")
    return images, labels
