"""The public API documents its parameters and what it returns: every public function and method of
the merges, the adapters, the method base classes, the runtime entry points, the run set-up and
export/inference has an ``Args:`` section naming each parameter, and a ``Returns:`` section unless
it returns None."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator

import pytest

from fedlorm import adapters, export, inference, merging, run_setup
from fedlorm.adapters import peft_io
from fedlorm.methods import base, registry
from fedlorm.runtime import experiment, simulator

MODULES = {
    merging: merging.__all__,
    adapters: adapters.__all__,
    peft_io: ["deployed_factors", "export_peft", "import_peft", "adapter_ranks"],
    base: ["Client", "Server", "add_arrays", "payload_bytes"],
    registry: ["Method", "check_method_config"],
    simulator: ["run_simulation", "resume_simulation"],
    experiment: ["build_experiment", "build_experiment_without_data", "effective_config"],
    export: ["save_model", "load_model", "read_model_info", "model_preprocessing"],
    inference: ["read_image", "predict_images", "evaluate_saved"],
    run_setup: [name for name in run_setup.__all__ if name[0].islower() or name == "RunSetup"],
}
"""Module → the public names whose documentation this file checks."""

UNDOCUMENTED = {"forward", "extra_repr"}
"""Methods documented by what they override (``nn.Module``'s)."""


def _callables() -> Iterator[tuple[str, Callable]]:
    for module, names in MODULES.items():
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                yield f"{module.__name__}.{name}", obj
                for attr, member in vars(obj).items():
                    public = not attr.startswith("_") and attr not in UNDOCUMENTED
                    if inspect.isfunction(member) and member.__name__ == attr and public:
                        yield f"{module.__name__}.{name}.{attr}", member
            elif callable(obj):
                yield f"{module.__name__}.{name}", obj


CALLABLES = dict(_callables())


def test_the_list_reaches_the_whole_public_api():
    assert len(CALLABLES) > 60
    assert {"fedlorm.merging.merge_b", "fedlorm.methods.base.Server.aggregate"} <= set(CALLABLES)


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_parameters_and_returns_are_documented(name):
    obj = CALLABLES[name]
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and target is object.__init__:
        return
    signature = inspect.signature(target)
    params = [p for p in signature.parameters if p not in ("self", "cls")]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = [p for p in params if signature.parameters[p].kind not in variadic]
    if params and not (inspect.isclass(obj) and _is_dataclass_like(obj)):
        assert "Args:" in doc, f"{name} has no Args: section"
        args = doc.split("Args:", 1)[1]
        missing = [p for p in params if not re.search(rf"^\s+{p}:", args, re.MULTILINE)]
        assert missing == [], f"{name} documents no {missing}"
    returns = signature.return_annotation
    if not inspect.isclass(obj) and returns not in (None, "None", inspect.Signature.empty):
        assert "Returns:" in doc or "Yields:" in doc, f"{name} has no Returns: section"


def _is_dataclass_like(cls: type) -> bool:
    """Dataclasses document their fields beside them, not in an Args: section."""
    return hasattr(cls, "__dataclass_fields__")
