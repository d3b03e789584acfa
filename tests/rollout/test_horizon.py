import numpy as np
import pytest
import torch

from fastopd.rollout import Horizon, resolve_horizon


def test_full():
    h = Horizon.full(64)
    assert [h(k) for k in (0, 1, 1000)] == [64, 64, 64]
    assert h.max_new_tokens == 64


@pytest.mark.parametrize(
    "ratio,t,expected",
    [pytest.param(0.1, 1024, 102, id="r0.1-T1024"), pytest.param(0.25, 512, 128, id="r0.25-T512"),
     pytest.param(1.0, 7, 7, id="r1-T7"), pytest.param(0.01, 10, 1, id="r0.01-T10-floor1")],
)
def test_truncated(ratio, t, expected):
    h = Horizon.truncated(ratio, t)
    assert h(0) == expected and h(99) == expected


def test_progressive_follows_formula():
    h = Horizon.progressive(start=16, step=8, every=3, max_new_tokens=40)
    assert [h(k) for k in range(0, 16)] == [min(40, 16 + 8 * (k // 3)) for k in range(16)]
    assert h(10_000) == 40


def test_any_callable_and_int():
    assert resolve_horizon(lambda k: 3 + k, 4) == 7
    assert resolve_horizon(lambda k: np.int64(9), 0) == 9
    assert resolve_horizon(12, 3) == 12


@pytest.mark.parametrize(
    "horizon",
    [pytest.param(0, id="int0"), pytest.param(lambda k: 0, id="callable0"), pytest.param(lambda k: -2, id="neg"),
     pytest.param(lambda k: 2.5, id="float"), pytest.param(lambda k: None, id="none")],
)
def test_non_positive_horizon_raises(horizon):
    with pytest.raises(ValueError, match="positive int"):
        resolve_horizon(horizon, 0)


@pytest.mark.parametrize(
    "make",
    [pytest.param(lambda: Horizon.full(0), id="full0"), pytest.param(lambda: Horizon.truncated(0.0, 10), id="ratio0"),
     pytest.param(lambda: Horizon.truncated(1.5, 10), id="ratio1.5"),
     pytest.param(lambda: Horizon.progressive(0, 1, 1, 10), id="start0"),
     pytest.param(lambda: Horizon.progressive(1, 1, 0, 10), id="every0"),
     pytest.param(lambda: Horizon.progressive(1, -1, 1, 10), id="step-neg")],
)
def test_bad_schedule_raises(make):
    with pytest.raises(ValueError):
        make()


def test_negative_step_raises():
    with pytest.raises(ValueError, match="step"):
        Horizon.full(4)(-1)


def test_numpy_and_tensor_numbers_are_accepted():
    """Schedules and steps built from NumPy or tensor numbers (a config read through numpy, a step counter
    tensor) act as the same Python numbers."""
    assert Horizon.truncated(np.float32(0.5), np.int64(10))(np.int64(3)) == 5
    h = Horizon.progressive(np.int32(2), np.int64(3), np.int64(2), 20)
    assert [h(torch.tensor(k)) for k in range(5)] == [h(k) for k in range(5)] == [2, 2, 5, 5, 8]
    assert resolve_horizon(np.int64(7), torch.tensor(4)) == 7


@pytest.mark.parametrize("bad", [pytest.param(1.0, id="float"), pytest.param(True, id="bool"),
                                 pytest.param(torch.tensor(True), id="bool-tensor"),
                                 pytest.param(torch.tensor(1.0), id="float-tensor"),
                                 pytest.param(torch.tensor([1, 2]), id="two-element-tensor"),
                                 pytest.param("1", id="str")])
def test_non_integer_step_raises(bad):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        Horizon.full(4)(bad)


def test_non_number_ratio_names_the_type():
    with pytest.raises(ValueError, match="real number"):
        Horizon.truncated("0.5", 10)
