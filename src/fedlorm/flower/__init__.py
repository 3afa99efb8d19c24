"""Flower runtime: fedlorm's client/server protocol on a real federated engine (flwr, Message API).

``serverapp:app`` runs tasks × rounds and merges through :class:`strategy.FedlormStrategy`;
``clientapp:app`` answers each round with the same client code as the in-process simulator. Both
apps take their settings from Flower's run config (:mod:`fedlorm.flower.settings`).

This package is the only part of fedlorm that imports ``flwr`` (the optional ``flower`` extra), and
this ``__init__`` imports nothing, so ``fedlorm.flower.cli`` can be wired into ``fedlorm``'s command
line without loading Flower.
"""
