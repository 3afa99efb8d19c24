"""Flower's SecAgg+ with masks from the whole shared secret (:func:`fedlorm.secure.masks.expand_secret`).

Flower 1.42's ClientApp mod (``secaggplus_mod``) and ServerApp workflow (``SecAggPlusWorkflow``) both
draw every mask through the module-level name ``pseudo_rand_gen``, which folds the secret to a 32-bit
numpy seed. :func:`use_full_secret_masks` points that name, in both modules, at fedlorm's ChaCha20
generator; the protocol is otherwise Flower's, untouched. fedlorm calls it before every secure sum
(:func:`fedlorm.flower.secure.secure_sum`) and before every SecAgg+ message its ClientApp handles
(:func:`fedlorm.flower.secure_client.optional_secaggplus_mod`), so both ends of every mask use the
same generator. Another Flower app in the same process that runs SecAgg+ then uses it too; its peers
must then be fedlorm's as well.
"""

from __future__ import annotations

import importlib

__all__ = ["MASKED_MODULES", "use_full_secret_masks"]

MASKED_MODULES = (
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)
"""The Flower modules whose ``pseudo_rand_gen`` draws SecAgg+'s masks."""

_NAME = "pseudo_rand_gen"


def use_full_secret_masks() -> None:
    """Make Flower's SecAgg+ (client mod and server workflow) draw masks with ChaCha20 from the whole
    secret. Idempotent. RuntimeError if this Flower has no such generator to replace: secure
    aggregation then refuses to run rather than mask with 32-bit seeds."""
    from fedlorm.secure.masks import expand_secret  # here: fedlorm.secure loads torch, a query needs none

    for name in MASKED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, _NAME, None) is expand_secret:
            continue
        if not callable(getattr(module, _NAME, None)):
            raise RuntimeError(
                f"{name} has no {_NAME}: this Flower version's SecAgg+ cannot take fedlorm's mask "
                "generator; install flwr 1.42 (fedlorm[flower])"
            )
        setattr(module, _NAME, expand_secret)
