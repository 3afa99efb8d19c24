"""What a step sends each client: only the arrays of its broadcast the client does not hold already.

A client keeps the last array it received under each broadcast key (a Flower SuperNode in its node
state, :mod:`fedlorm.flower.node_state`), so a step need not send it again. Per key, a step's array
travels in one of three forms (a :class:`Part`):

- ``held``: the client holds exactly this array (same content digest); nothing travels;
- ``extend``: the client holds its leading part along one axis, and only the rest travels. This is
  how the earlier tasks' factors grow: at each task's start they gain the newest task's columns
  (B) and rows (A), and every earlier column and row stays as it was;
- ``full``: the whole array travels.

The server keeps a :class:`Ledger` of what each client holds, as content digests (SHA-256) and
shapes, and plans each client's :class:`Delta` from it; the client rebuilds the whole broadcast
with :func:`assemble`, which checks every array against its digest, so the arrays a client computes
with are the broadcast's bits or the client asks again (:class:`MissingBaseError`). A client holds
what it was sent once it has answered the step (:meth:`Ledger.delivered`); a client that did not
answer is forgotten (:meth:`Ledger.forget`) and gets its next broadcast in full.

Both runtimes count a step's download as the sum of its clients' deltas from the same ledger rules,
so they report the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EXTEND",
    "FULL",
    "HELD",
    "Broadcast",
    "Delta",
    "Held",
    "Ledger",
    "MissingBaseError",
    "Part",
    "assemble",
    "digest",
    "parts_from_json",
    "parts_to_json",
]

HELD, EXTEND, FULL = "held", "extend", "full"
_FORMS = (HELD, EXTEND, FULL)


def digest(value: Tensor) -> str:
    """Content digest of a tensor: SHA-256 over its dtype, shape and bytes (hex, 128 bits).

    Args:
        value: Any tensor, on any device.

    Returns:
        32 hex digits; equal for two tensors exactly when dtype, shape and every bit agree (up to
        SHA-256 collisions).
    """
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    sha = hashlib.sha256(f"{value.dtype}|{tuple(value.shape)}|".encode())
    sha.update(flat.view(torch.uint8).numpy().data)
    return sha.hexdigest()[:32]


@dataclass(frozen=True)
class Part:
    """How one broadcast array travels to one client."""

    form: str
    """``held``, ``extend`` or ``full``."""
    digest: str
    """Digest of the whole array (:func:`digest`)."""
    shape: tuple[int, ...]
    """Shape of the whole array."""
    base: str = ""
    """``extend``: digest of the leading part the client holds."""
    dim: int = -1
    """``extend``: the axis along which the client's array grows."""


@dataclass(frozen=True)
class Delta:
    """One client's share of a step's broadcast: every key's :class:`Part`, and what travels."""

    parts: dict[str, Part]
    arrays: dict[str, Tensor]
    """Whole arrays (``full``) and the remainders of grown ones (``extend``), by key."""

    @property
    def payload_bytes(self) -> int:
        """Bytes that travel: Σ numel · element_size of :attr:`arrays`."""
        return sum(t.numel() * t.element_size() for t in self.arrays.values())


class Broadcast:
    """One step's whole broadcast, with the digests the deltas need (each computed once a step).

    Args:
        arrays: The step's broadcast (:meth:`fedlorm.methods.Server.arrays`).
    """

    def __init__(self, arrays: Mapping[str, Tensor]) -> None:
        self.arrays = dict(arrays)
        self._digests: dict[str, str] = {}
        self._leading: dict[tuple[str, int, int], str] = {}

    def digest(self, key: str) -> str:
        """Digest of one array of the broadcast.

        Args:
            key: The array's broadcast key.

        Returns:
            Its :func:`digest`.
        """
        if key not in self._digests:
            self._digests[key] = digest(self.arrays[key])
        return self._digests[key]

    def leading_digest(self, key: str, dim: int, length: int) -> str:
        """Digest of the leading part of one array of the broadcast.

        Args:
            key: The array's broadcast key.
            dim: The axis.
            length: How many entries along ``dim`` the part keeps.

        Returns:
            The :func:`digest` of ``array.narrow(dim, 0, length)``.
        """
        index = (key, dim, length)
        if index not in self._leading:
            self._leading[index] = digest(self.arrays[key].narrow(dim, 0, length))
        return self._leading[index]


@dataclass(frozen=True)
class Held:
    """What a client holds under one key: the array's digest and shape."""

    digest: str
    shape: tuple[int, ...]


def _grown_axis(held: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    """The one axis along which ``shape`` extends ``held`` (all others equal), or None."""
    if len(held) != len(shape):
        return None
    differ = [i for i, (a, b) in enumerate(zip(held, shape, strict=True)) if a != b]
    if len(differ) != 1 or not 0 < held[differ[0]] < shape[differ[0]]:
        return None
    return differ[0]


class Ledger:
    """What each client holds, as the server knows it: key → :class:`Held`, per client.

    Clients are any hashable ids the transport chooses (the in-process runtime and the protocol's
    count use client indices; the Flower transport also keeps one by SuperNode id).
    """

    def __init__(self) -> None:
        self._held: dict[int, dict[str, Held]] = {}

    def holdings(self, client: int) -> dict[str, Held]:
        """What one client holds.

        Args:
            client: The client.

        Returns:
            Key → :class:`Held` (a copy; empty for a client never sent anything).
        """
        return dict(self._held.get(client, {}))

    def plan(self, client: int, broadcast: Broadcast, lacking: Iterable[str] = ()) -> Delta:
        """``client``'s delta of ``broadcast``.

        Args:
            client: The client the delta is for.
            broadcast: The step's whole broadcast.
            lacking: Keys the client said it lacks (they travel in full).

        Returns:
            Per key ``held`` where the client holds the array, ``extend`` where it holds its leading
            part along one axis, else ``full``; and the arrays that travel.
        """
        held = self._held.get(client, {})
        missing = set(lacking)
        parts: dict[str, Part] = {}
        arrays: dict[str, Tensor] = {}
        for key, value in broadcast.arrays.items():
            whole, shape = broadcast.digest(key), tuple(value.shape)
            have = held.get(key) if key not in missing else None
            dim = _grown_axis(have.shape, shape) if have is not None else None
            if have is not None and have.digest == whole:
                parts[key] = Part(HELD, whole, shape)
            elif (
                have is not None
                and dim is not None
                and broadcast.leading_digest(key, dim, have.shape[dim]) == have.digest
            ):
                start = have.shape[dim]
                parts[key] = Part(EXTEND, whole, shape, base=have.digest, dim=dim)
                arrays[key] = value.narrow(dim, start, shape[dim] - start).contiguous()
            else:
                parts[key] = Part(FULL, whole, shape)
                arrays[key] = value
        return Delta(parts, arrays)

    def delivered(self, client: int, broadcast: Broadcast) -> None:
        """Record that a client answered a step: it now holds every array of the step's broadcast,
        and keeps the arrays of earlier steps under keys this one does not carry.

        Args:
            client: The client.
            broadcast: The step's whole broadcast.
        """
        held = self._held.setdefault(client, {})
        for key, value in broadcast.arrays.items():
            held[key] = Held(broadcast.digest(key), tuple(value.shape))

    def forget(self, client: int) -> None:
        """Record that a client did not answer: nothing it holds is known any more.

        Args:
            client: The client; its next delta is the whole broadcast.
        """
        self._held.pop(client, None)

    def to_record(self) -> dict[str, Any]:
        """The ledger in plain (JSON) form, for a checkpoint.

        Returns:
            ``holdings``: the distinct tables (key → [digest, shape]); ``clients``: client → the
            index of its table (clients that hold the same share one).
        """
        tables: list[dict[str, list[Any]]] = []
        index: dict[str, int] = {}
        clients: dict[str, int] = {}
        for client, held in sorted(self._held.items()):
            table = {key: [h.digest, list(h.shape)] for key, h in sorted(held.items())}
            text = json.dumps(table, sort_keys=True)
            if text not in index:
                index[text] = len(tables)
                tables.append(table)
            clients[str(client)] = index[text]
        return {"holdings": tables, "clients": clients}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Ledger:
        """Inverse of :meth:`to_record`; ValueError if ``record`` is not one.

        Args:
            record: What :meth:`to_record` returned (an empty mapping: an empty ledger).

        Returns:
            The ledger.
        """
        ledger = cls()
        try:
            tables = [
                {str(key): Held(str(d), tuple(int(n) for n in shape)) for key, (d, shape) in table.items()}
                for table in record.get("holdings", [])
            ]
            for client, table in record.get("clients", {}).items():
                ledger._held[int(client)] = dict(tables[int(table)])
        except (TypeError, ValueError, IndexError, AttributeError) as err:
            raise ValueError(f"not a delivery ledger: {err}") from None
        return ledger


class MissingBaseError(ValueError):
    """The client lacks what a part refers to (or holds something else); ``keys`` names them."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = sorted(keys)
        super().__init__(f"this client lacks the arrays of {len(self.keys)} broadcast keys: {self.keys[:3]}")


def assemble(
    parts: Mapping[str, Part],
    arrays: Mapping[str, Tensor],
    held: Mapping[str, Tensor],
    held_digests: Mapping[str, str],
) -> dict[str, Tensor]:
    """The whole broadcast, rebuilt on the client from what travelled and what it holds.

    Every rebuilt array is checked against its part's digest.

    Args:
        parts: Every key's part (:attr:`Delta.parts`).
        arrays: What travelled (:attr:`Delta.arrays`).
        held: The arrays the client holds, by key.
        held_digests: Their digests, as recorded when they arrived.

    Returns:
        Key → the broadcast's array, for every key of ``parts``.

    Raises:
        MissingBaseError: For the ``held`` and ``extend`` parts whose base the client lacks, or
            whose rebuilt array does not match its digest; the client should ask again.
        ValueError: If what travelled does not fit the parts (a malformed message).
    """
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    extra = sorted(set(arrays) - set(parts))
    if extra:
        raise ValueError(f"arrays without a part: {extra[:3]}")
    for key, part in parts.items():
        if part.form not in _FORMS:
            raise ValueError(f"{key}: unknown part form {part.form!r}")
        if part.form == HELD:
            if held_digests.get(key) != part.digest or key not in held:
                missing.append(key)
                continue
            value = held[key]
        elif key not in arrays:
            raise ValueError(f"{key}: the {part.form} part's array did not travel")
        elif part.form == FULL:
            value = arrays[key]
        else:
            if held_digests.get(key) != part.base or key not in held:
                missing.append(key)
                continue
            try:
                value = torch.cat([held[key], arrays[key]], dim=part.dim)
            except (RuntimeError, IndexError) as err:
                raise ValueError(f"{key}: the remainder does not extend the held array: {err}") from None
        if tuple(value.shape) != part.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)}; the part says {part.shape}")
        if part.form != HELD and digest(value) != part.digest:
            if part.form == FULL:
                raise ValueError(f"{key}: the array does not match its digest")
            missing.append(key)
            continue
        out[key] = value
    if missing:
        raise MissingBaseError(missing)
    return out


def parts_to_json(parts: Mapping[str, Part]) -> str:
    """Parts as one JSON string, as a message carries them.

    Args:
        parts: Key → part (:attr:`Delta.parts`).

    Returns:
        The JSON text.
    """
    return json.dumps(
        {key: [p.form, p.digest, list(p.shape), p.base, p.dim] for key, p in parts.items()}, sort_keys=True
    )


def parts_from_json(text: str) -> dict[str, Part]:
    """Inverse of :func:`parts_to_json`.

    Args:
        text: What :func:`parts_to_json` returned.

    Returns:
        Key → part.

    Raises:
        ValueError: If ``text`` is not such a JSON text, or names an unknown form.
    """
    try:
        raw = json.loads(text)
        parts = {
            str(key): Part(str(form), str(d), tuple(int(n) for n in shape), str(base), int(dim))
            for key, (form, d, shape, base, dim) in raw.items()
        }
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"malformed broadcast parts: {err}") from None
    bad = sorted(key for key, part in parts.items() if part.form not in _FORMS)
    if bad:
        raise ValueError(f"unknown part form for {bad[:3]}")
    return parts
