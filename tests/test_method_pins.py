"""Pinned numbers of every registered method on a shrunk smoke preset (issue 14: refactors of the
method layer must not move any of them).

Each case is one in-process run of the ``smoke`` preset made smaller (fewer, smaller images, three
clients, evaluation at task ends only) so that the whole file stays within a couple of minutes; the
variants exercise every head strategy and cross-task rule, full and diagonal statistics and both
statistics models. Besides the accuracy matrix, a case pins each step's mean training loss and
traffic, and float64 digests of the deployed head, factors and frozen update, which catch a change
long before it moves an accuracy on 20 test images.

The pins must hold on any CPU, hence the tolerances below. Float kernels differ between CPUs (the
vector-instruction code paths torch, oneDNN and MKL choose), and training amplifies their round-off:
between the machine that pinned these numbers and an AVX-512 one (which pinned ``ccvr`` and ``ewc``), digests
moved by up to 1.3e-2 relative (LoRM with the RegMean head), losses by up to 1e-3 (LwF), and LwF's
accuracy matrix by one test image.

To re-pin after an intended change: ``python tests/test_method_pins.py`` prints the new table.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedlorm.config import apply_overrides
from fedlorm.methods import METHODS
from fedlorm.presets import preset_config
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation

SHRINK = [
    "data.train_per_class=6",
    "data.test_per_class=4",
    "data.image_size=24",
    "scenario.num_clients=3",
    "train.batch_size=4",
    "train.eval_every_round=false",
]
"""The smoke preset made cheaper; every method's code path stays the same. Batches of 4 give each
client several steps per round: with one, B would get no gradient through the zero-initialised head
in its only step, and no adapter would ever move."""

CNN_METHODS = [name for name, method in METHODS.items() if not method.vit_only]
"""Methods the (EfficientNet) smoke preset can run; ViT-only ones (l2p, coda-p) refuse it and are
tested on a small random ViT in tests/test_prompts.py."""

CASES: dict[str, list[str]] = {
    **{name: [f"method={name}"] for name in CNN_METHODS if name != "lorm-fsa"},
    "lorm-fsa": ["method=lorm-fsa", "lorm.head_merge=analytic"],
    "lorm/full-stats+regmean-head": ["lorm.alpha_backbone=0.5", "lorm.head_merge=regmean"],
    "lorm/trained-stats+merged-start+analytic": [
        "lorm.stats_model=trained",
        "lorm.task_start=merged",
        "lorm.head_merge=analytic",
    ],
    "fedavg/simple-mean+diag-regmean-head": [
        "method=fedavg",
        "lorm.cross_task=simple_mean",
        "lorm.head_merge=regmean",
        "lorm.alpha_head=0",
    ],
    "regmean/task-arithmetic+analytic": [
        "method=regmean",
        "lorm.cross_task=task_arithmetic",
        "lorm.head_merge=analytic",
    ],
    "head-only/analytic": ["method=head-only", "lorm.head_merge=analytic"],
    "ffa/adapt-first-task": ["method=ffa", "lorm.adapt_tasks=1", "lorm.head_merge=analytic"],
}
"""Case name → overrides on the shrunk smoke preset."""


ONE_TEST_IMAGE = 100 / 20 + 1e-6
"""Accuracy tolerance, in points: one image of a task's 20 test images (5 classes × 4)."""
LOSS_RTOL = 1e-2
DIGEST_RTOL = 5e-2


def _pin(overrides: list[str]) -> dict[str, Any]:
    """The numbers a case pins: accuracy matrix, per-step loss and traffic, deployed digest."""
    cfg = apply_overrides(preset_config("smoke"), [*SHRINK, *overrides])
    exp = build_experiment(cfg)
    results = run_simulation(cfg, experiment=exp)
    return {
        "accuracy": results["accuracy_matrix"],
        "loss": [_number(r["train_loss"]) for r in results["rounds"]],
        "upload": [r["upload_bytes"] for r in results["rounds"]],
        "download": [r["download_bytes"] for r in results["rounds"]],
        "digest": _digest(exp.server.deployed_arrays()),
    }


def _digest(deployed: dict[str, torch.Tensor]) -> list[float]:
    """Float64 sums of |x| of the deployed head, of the adapters' factors, and of every layer's
    deployed frozen update ΔW (as the product of its factor pair, or dense)."""
    head = sum(float(v.double().abs().sum()) for k, v in deployed.items() if k.startswith("head."))
    factors = sum(float(v.double().abs().sum()) for k, v in deployed.items() if ".lora_" in k)
    update = 0.0
    for key, value in deployed.items():
        if key.endswith(".fixed_B"):
            product = value.double() @ deployed[key.removesuffix("B") + "A"].double()
            update += float(product.abs().sum())
        elif key.endswith(".fixed_delta"):
            update += float(value.double().abs().sum())
    return [head, factors, update]


def _number(value: Any) -> float | None:
    return None if value == "" else float(value)


PINS: dict[str, dict[str, Any]] = {
    "lorm": {
        "accuracy": [[60.00000238418579], [40.00000059604645, 15.000000596046448]],
        "loss": [1.588913, 1.526365, None, 1.595475, 1.568664, None],
        "upload": [887304, 1082760, 258432, 887304, 1082760, 258432],
        "download": [700536, 442104, 412152, 1093632, 442104, 412152],
        "digest": [4.609255548696638, 517.3012787495247, 85.55925093128221],
    },
    "lorm-avg": {
        "accuracy": [[60.00000238418579], [40.00000059604645, 15.000000596046448]],
        "loss": [1.588913, 1.526272, None, 1.595475, 1.568649, None],
        "upload": [884232, 824328, 258432, 884232, 824328, 258432],
        "download": [700536, 442104, 412152, 1093632, 442104, 412152],
        "digest": [4.595986991113023, 516.5806709478836, 84.59594985301725],
    },
    "fedavg": {
        "accuracy": [[60.00000238418579], [40.00000059604645, 25.0]],
        "loss": [1.589318, 1.500551, None, 1.595475, 1.551123, None],
        "upload": [1401096, 1401096, 258432, 1401096, 1401096, 258432],
        "download": [700536, 700536, 700536, 1093632, 700536, 700536],
        "digest": [5.050244566976744, 515.7529201278603, 202.1576093727525],
    },
    "ffa": {
        "accuracy": [[60.00000238418579], [55.000001192092896, 15.000000596046448]],
        "loss": [1.588913, 1.529923, None, 1.595475, 1.569216, None],
        "upload": [884232, 884232, 258432, 884232, 884232, 258432],
        "download": [700536, 442104, 442104, 1093632, 442104, 442104],
        "digest": [4.624498409499324, 506.6438646739223, 214.92213717607183],
    },
    "fedavg-product": {
        "accuracy": [[60.00000238418579], [40.00000059604645, 25.0]],
        "loss": [1.589318, 1.501484, None, 1.595475, 1.54425, None],
        "upload": [75814152, 75814152, 258432, 75814152, 75814152, 258432],
        "download": [700536, 700536, 700536, 1093632, 700536, 700536],
        "digest": [5.118070669331246, 117.71949504864685, 143.1356124501774],
    },
    "regmean": {
        "accuracy": [[55.000001192092896], [40.00000059604645, 20.000000298023224]],
        "loss": [1.589318, 1.491694, None, 1.595475, 1.541452, None],
        "upload": [76072584, 76072584, 258432, 76072584, 76072584, 258432],
        "download": [700536, 700536, 700536, 1093632, 700536, 700536],
        "digest": [5.153388846924599, 101.13824479861108, 154.899003591873],
    },
    "head-only": {
        "accuracy": [[55.000001192092896], [44.999998807907104, 5.000000074505806]],
        "loss": [1.589866, 1.548898, 1.596, 1.581632],
        "upload": [307464, 307464, 307464, 307464],
        "download": [700536, 153720, 412152, 153720],
        "digest": [4.24503281991565, 506.6438646739223, 0.0],
    },
    "finetune": {
        "accuracy": [[60.00000238418579], [20.000000298023224, 20.000000298023224]],
        "loss": [1.589318, 1.500551, 1.569082, 1.386641],
        "upload": [1401096, 1401096, 1401096, 1401096],
        "download": [700536, 700536, 700536, 700536],
        "digest": [7.615204768666899, 624.5232691991662, 0.0],
    },
    "lwf": {
        "accuracy": [[60.00000238418579], [20.000000298023224, 20.000000298023224]],
        "loss": [1.589318, 1.500551, 1.568888, 1.393431],
        "upload": [1401096, 1401096, 1401096, 1401096],
        "download": [700536, 700536, 1401072, 700536],
        "digest": [7.575212057998215, 619.5902767910827, 0.0],
    },
    "ewc": {
        "accuracy": [[60.00000238418579], [30.000001192092896, 40.00000059604645]],
        "loss": [1.589318, 1.500551, None, 1.569082, 1.486079],
        "upload": [1401096, 1401096, 1093656, 1401096, 1401096],
        "download": [700536, 700536, 700536, 1093632, 700536],
        "digest": [7.211227110974505, 605.4024010184186, 0.0],
    },
    "joint": {
        "accuracy": [[22.499999403953552]],
        "loss": [2.278272, 1.962974],
        "upload": [467032, 467032],
        "download": [233512, 233512],
        "digest": [44.910397515195655, 739.5541717922821, 0.0],
    },
    "lorm-fsa": {
        "accuracy": [[69.9999988079071], [20.000000298023224, 44.999998807907104]],
        "loss": [1.588913, 1.526365, None, None, None],
        "upload": [887304, 1082760, 258432, 39536784, 39536784],
        "download": [700536, 442104, 412152, 835200, 153720],
        "digest": [339.3359090976155, 517.3814681894834, 123.66309033671712],
    },
    "lorm/full-stats+regmean-head": {
        "accuracy": [[69.9999988079071], [30.000001192092896, 25.0]],
        "loss": [1.588913, 1.44267, None, 1.595475, 1.540884, None],
        "upload": [40208904, 228127752, 187981824, 40208904, 228127752, 187981824],
        "download": [700536, 442104, 412152, 1093632, 442104, 412152],
        "digest": [97.657942191659, 2553.586347754551, 15574.567484847965],
    },
    "lorm/trained-stats+merged-start+analytic": {
        "accuracy": [[69.9999988079071], [30.000001192092896, 50.0]],
        "loss": [1.588913, 1.526365, None, None, 1.585351, 1.54705, None, None],
        "upload": [887304, 1082760, 258432, 39536784, 887304, 1082760, 258432, 39536784],
        "download": [700536, 442104, 412152, 835200, 258432, 442104, 412152, 988920],
        "digest": [271.8008775227536, 513.5452971357838, 136.72813709674975],
    },
    "fedavg/simple-mean+diag-regmean-head": {
        "accuracy": [[55.000001192092896], [34.99999940395355, 25.0]],
        "loss": [1.589318, 1.471139, 1.595475, 1.547731],
        "upload": [1431816, 1431816, 1431816, 1431816],
        "download": [700536, 700536, 1247352, 700536],
        "digest": [8.809505299082957, 514.0784888827777, 232.7063382104911],
    },
    "regmean/task-arithmetic+analytic": {
        "accuracy": [[94.9999988079071], [50.0, 64.99999761581421]],
        "loss": [1.589318, 1.491694, None, 1.595475, 1.541452, None],
        "upload": [76072584, 76072584, 39536784, 76072584, 76072584, 39536784],
        "download": [700536, 700536, 1247352, 805248, 700536, 1247352],
        "digest": [59.26052173787298, 101.13824479861108, 297.9809121393884],
    },
    "head-only/analytic": {  # no training rounds: the deployed head is the analytic solve alone
        "accuracy": [[50.0], [5.000000074505806, 44.999998807907104]],
        "loss": [None, None],
        "upload": [39536784, 39536784],
        "download": [700536, 153720],
        "digest": [575.7658522471756, 507.6787375446631, 0.0],
    },
    "ffa/adapt-first-task": {
        "accuracy": [[75.0], [15.000000596046448, 30.000001192092896]],
        "loss": [1.588913, 1.529923, None, None, None],
        "upload": [884232, 884232, 258432, 39536784, 39536784],
        "download": [700536, 442104, 442104, 835200, 153720],
        "digest": [396.63974714893266, 505.8351416330462, 305.6028215134643],
    },
    "ties": {
        "accuracy": [[60.00000238418579], [40.00000059604645, 20.000000298023224]],
        "loss": [1.589318, 1.500551, 1.595475, 1.551123],
        "upload": [1401096, 1401096, 1401096, 1401096],
        "download": [700536, 700536, 1247352, 700536],
        "digest": [5.050244566976744, 515.7529201278603, 327.5423896994565],
    },
    "fisher": {
        "accuracy": [[50.0], [20.000000298023224, 20.000000298023224]],
        "loss": [1.589318, 1.475745, None, 1.595475, 1.536062, None],
        "upload": [2494728, 2494728, 258432, 2494728, 2494728, 258432],
        "download": [700536, 700536, 700536, 1093632, 700536, 700536],
        "digest": [5.469942992073811, 519.5324878118872, 298.41291510295986],
    },
    "ccvr": {
        "accuracy": [[80.0000011920929], [50.0, 55.000001192092896]],
        "loss": [1.589318, 1.500551, None, None, 1.595518, 1.550844, None, None],
        "upload": [1401096, 1401096, 258432, 196761720, 1401096, 1401096, 258432, 196761720],
        "download": [700536, 700536, 700536, 835200, 805248, 700536, 700536, 1247352],
        "digest": [32.72905150143697, 516.8232412918825, 207.07750766841286],
    },
}
"""Captured at the code before the method refactor (``python tests/test_method_pins.py``). The download
lists were re-pinned when a step began to send each client only what it does not hold (issue 24); every
other number is the same."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the runs are small and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_registered_method_is_pinned():
    assert set(CNN_METHODS) <= set(CASES) == set(PINS)


@pytest.mark.parametrize("case", list(CASES))
def test_method_gives_its_pinned_numbers(case):
    got, want = _pin(CASES[case]), PINS[case]
    assert got["upload"] == want["upload"]
    assert got["download"] == want["download"]
    for row, pinned in zip(got["accuracy"], want["accuracy"], strict=True):
        assert row == pytest.approx(pinned, abs=ONE_TEST_IMAGE)
    assert len(got["accuracy"]) == len(want["accuracy"])
    for loss, pinned in zip(got["loss"], want["loss"], strict=True):
        assert (loss is None and pinned is None) or math.isclose(loss, pinned, rel_tol=LOSS_RTOL)
    assert got["digest"] == pytest.approx(want["digest"], rel=DIGEST_RTOL, abs=1e-12)


if __name__ == "__main__":
    import pprint

    torch.set_num_threads(1)
    pprint.pprint({case: _pin(overrides) for case, overrides in CASES.items()}, width=110, sort_dicts=False)
