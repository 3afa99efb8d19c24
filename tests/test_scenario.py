"""Scenario: task splits, class orders, label → position mapping and validation."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedlorm.fcl import Scenario, make_scenario


def test_equal_split_natural_order():
    s = make_scenario(100, 10)
    assert s.num_tasks == 10 and s.num_classes == 100
    assert s.task_sizes == (10,) * 10
    assert s.class_order == tuple(range(100))
    assert s.task_classes(3) == range(30, 40)
    assert s.seen_classes(3) == range(0, 40)
    assert s.task_of_position(0) == 0
    assert s.task_of_position(39) == 3
    assert s.task_of_position(40) == 4
    assert s.task_of_position(99) == 9


def test_explicit_sizes_cars196():
    s = make_scenario(196, [20] * 9 + [16])
    assert s.num_tasks == 10
    assert s.task_classes(8) == range(160, 180)
    assert s.task_classes(9) == range(180, 196)
    assert s.seen_classes(9) == range(196)
    assert s.task_of_position(195) == 9
    assert s.task_of_position(179) == 8


def test_random_order_reproducible():
    a, b, c = (make_scenario(20, 4, "random", seed=k) for k in (7, 7, 8))
    assert a == b
    assert a.class_order != c.class_order
    assert sorted(a.class_order) == list(range(20))
    expected = tuple(int(x) for x in np.random.default_rng(7).permutation(20))
    assert a.class_order == expected
    assert a.task_label_ids(1) == expected[5:10]


def test_to_positions_numpy_and_torch():
    s = make_scenario(4, 2, class_order=[2, 0, 3, 1])
    labels = np.array([0, 1, 2, 3, 2])
    pos = s.to_positions(labels)
    assert isinstance(pos, np.ndarray) and pos.dtype == np.int64
    assert pos.tolist() == [1, 3, 0, 2, 0]
    t = s.to_positions(torch.tensor([[3, 1], [0, 2]], dtype=torch.int32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64
    assert t.tolist() == [[2, 3], [1, 0]]
    assert s.task_of_position(int(pos[0])) == 0  # label 0 is the 2nd class learned, task 0


def test_to_positions_unknown_label():
    s = Scenario(class_order=(5, 7), task_sizes=(1, 1))  # a subset of a dataset's labels
    assert s.to_positions(np.array([7, 5])).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"\[6, 9\]"):
        s.to_positions(np.array([5, 6, 9]))
    with pytest.raises(ValueError, match="integers"):
        s.to_positions(np.array([5.0]))


def test_dict_roundtrip_and_frozen():
    s = make_scenario(10, [3, 7], "random", seed=1)
    d = json.loads(json.dumps(s.to_dict()))
    assert Scenario.from_dict(d) == s
    assert hash(Scenario.from_dict(d)) == hash(s)
    assert dataclasses.asdict(s) == {"class_order": s.class_order, "task_sizes": (3, 7)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.task_sizes = (10,)  # type: ignore[misc]


def test_errors():
    with pytest.raises(ValueError, match=r"10 classes do not split into 3"):
        make_scenario(10, 3)
    with pytest.raises(ValueError, match="sum to 9"):
        make_scenario(10, [4, 5])
    with pytest.raises(ValueError, match="positive"):
        make_scenario(10, [10, 0])
    with pytest.raises(ValueError, match="tasks must be >= 1"):
        make_scenario(10, 0)
    with pytest.raises(ValueError, match="permutation"):
        make_scenario(3, 1, class_order=[0, 1, 1])
    with pytest.raises(ValueError, match="permutation"):
        make_scenario(3, 1, class_order=[0, 1, 3])
    with pytest.raises(ValueError, match="class_order must be"):
        make_scenario(3, 1, class_order="shuffled")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        make_scenario(4, 2).task_classes(2)
    with pytest.raises(ValueError, match="out of range"):
        make_scenario(4, 2).task_of_position(4)
    with pytest.raises(ValueError, match="repeats"):
        Scenario(class_order=(1, 1), task_sizes=(2,))
