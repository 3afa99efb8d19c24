"""A merge that cannot take the server down: :meth:`Server.aggregate` with the previous state kept on
failure.

Sums that passed every check can still make a closed-form merge fail (a solve on a sum that a hostile
client bent, a method's own consistency check) or give non-finite factors. Either way the run must go
on with the state it had: :func:`guarded_aggregate` snapshots the server's state
(:meth:`Server.state_dict`, which holds everything later steps read), runs the merge, and restores the
snapshot if the merge raised or left a non-finite value behind. Both runtimes fold every step through
it, so the rule holds for the in-process simulator and the Flower ServerApp alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedlorm.methods.base import Arrays, Instruction, Server

__all__ = ["MERGE_ERRORS", "MergeOutcome", "guarded_aggregate"]

MERGE_ERRORS = (ValueError, RuntimeError, ArithmeticError, IndexError, KeyError, TypeError)
"""What a merge on bad sums raises (torch's linear-algebra errors are RuntimeErrors); anything else is
a bug of the server's own and propagates."""


@dataclass(frozen=True)
class MergeOutcome:
    """What :func:`guarded_aggregate` did: ``failure`` is None after a merge, else why the state was kept."""

    failure: str | None
    seconds: float

    @property
    def merged(self) -> bool:
        """The merge ran and its result was kept."""
        return self.failure is None


def guarded_aggregate(
    server: Server, instruction: Instruction, sums: Arrays, num_examples: int
) -> MergeOutcome:
    """``server.aggregate(instruction, sums, num_examples)``; on an error or a non-finite result the
    server's state is restored to what it was before, and the outcome says why."""
    before = {key: value.detach().clone() for key, value in server.state_dict().items()}
    started = time.perf_counter()
    try:
        server.aggregate(instruction, sums, num_examples)
    except MERGE_ERRORS as err:
        failure = f"the merge failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    else:
        bad = next(
            (
                key
                for key, value in sorted(server.state_dict().items())
                if value.is_floating_point() and not bool(torch.isfinite(value).all())
            ),
            None,
        )
        failure = None if bad is None else f"the merge left non-finite values in {bad}"
    seconds = time.perf_counter() - started
    if failure is not None:
        server.load_state_dict(before)
    return MergeOutcome(failure, seconds)
