"""What the ServerApp sends each SuperNode of a step, and which bytes it reports.

Two ledgers of :mod:`fedlorm.runtime.delivery` decide it:

- the run's ledger, by client index, is what each client holds as the protocol counts it. The
  in-process runtime keeps the same one, and both checkpoint it, so both report the same download
  for every step, a resumed run included;
- this ServerApp's ledger, by SuperNode id, is what each connected node holds of what this ServerApp
  sent it. A node's message is planned from it, so a node that was never sent anything here (a
  new node, any node after the ServerApp was resumed) gets the whole broadcast.

What a node is sent beyond its client's delta is reported apart (:class:`~fedlorm.flower.strategy.Resent`),
as are the arrays a node asks for again because it lacks them (a node that lost its state). A node
that answers a step holds its broadcast; one that does not is forgotten in both ledgers and gets the
next broadcast in full.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedlorm.flower.strategy import Resent
from fedlorm.runtime.delivery import Broadcast, Delta, Ledger

__all__ = ["ASKED", "NEW_TO_NODE", "FlowerDelivery"]

NEW_TO_NODE = "this ServerApp has sent the node nothing it still holds (a new node, or a resumed run)"
"""Why a node got more than its client's delta."""
ASKED = "the node asked again for arrays it lacks"
"""Why a node got arrays a second time in one step."""


class FlowerDelivery:
    """The run's ledger (by client) and this ServerApp's (by SuperNode); see the module docstring.

    Args:
        run: The run's ledger, e.g. restored from a checkpoint; empty if None.
    """

    def __init__(self, run: Ledger | None = None) -> None:
        self.run = run or Ledger()
        self.nodes = Ledger()

    def plan(
        self, nodes: Mapping[int, int], broadcast: Broadcast
    ) -> tuple[dict[int, Delta], int, list[Resent]]:
        """Each node's share of ``broadcast``.

        Args:
            nodes: SuperNode id → the client it serves, for the nodes the step is sent to.
            broadcast: The step's whole broadcast.

        Returns:
            Node → its delta; the step's download as the protocol counts it (the clients' deltas,
            summed); and what went to nodes beyond their clients' deltas.
        """
        deltas: dict[int, Delta] = {}
        download, extra = 0, []
        for node, client in sorted(nodes.items()):
            counted = self.run.plan(client, broadcast).payload_bytes
            delta = self.nodes.plan(node, broadcast)
            download += counted
            if delta.payload_bytes > counted:
                extra.append(Resent(node, client, delta.payload_bytes - counted, NEW_TO_NODE))
            deltas[node] = delta
        return deltas, download, extra

    def resend(
        self, node: int, client: int, broadcast: Broadcast, keys: Iterable[str]
    ) -> tuple[Delta, Resent]:
        """What a node that asked again for ``keys`` is sent: its delta with those keys in full.

        Args:
            node: The SuperNode.
            client: The client it serves.
            broadcast: The step's whole broadcast.
            keys: The keys it lacks.

        Returns:
            The delta, and its record.
        """
        delta = self.nodes.plan(node, broadcast, lacking=keys)
        return delta, Resent(node, client, delta.payload_bytes, ASKED)

    def settle(self, nodes: Mapping[int, int], broadcast: Broadcast, answered: Iterable[int]) -> None:
        """After a step: the nodes of ``answered`` (and their clients) hold ``broadcast``; the others
        of ``nodes`` are forgotten.

        Args:
            nodes: SuperNode id → client, for the nodes the step was sent to.
            broadcast: The step's whole broadcast.
            answered: The SuperNodes that answered the step (a plain reply that is no error, or a
                masked vector in the secure sum).
        """
        done = set(answered)
        for node, client in nodes.items():
            if node in done:
                self.run.delivered(client, broadcast)
                self.nodes.delivered(node, broadcast)
            else:
                self.run.forget(client)
                self.nodes.forget(node)
