"""fastopd._numbers: the integer and real reading behind every id, count, size and step argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastopd._numbers import as_int, as_real, is_bool, strict_index


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_, torch.tensor(True), torch.tensor([False])],
                         ids=["python-true", "python-false", "numpy-true", "numpy-false", "tensor-true",
                              "one-element-tensor-false"])
def test_every_kind_of_bool_is_refused(value):
    """A NumPy bool is refused by this check, not by operator.index: NumPy < 2.3 reads it as 0/1 there."""
    assert is_bool(value)
    with pytest.raises(TypeError, match="is a bool"):
        strict_index(value)
    assert as_int(value) is None and as_real(value) is None


@pytest.mark.parametrize("value, want", [
    pytest.param(7, 7, id="python-int"),
    pytest.param(np.int64(7), 7, id="numpy-int64"),
    pytest.param(np.uint8(7), 7, id="numpy-uint8"),
    pytest.param(torch.tensor(7), 7, id="tensor-0d"),
    pytest.param(torch.tensor([7], dtype=torch.int32), 7, id="tensor-one-element-int32"),
    pytest.param(-3, -3, id="negative"),
])
def test_integers_of_every_kind_read_as_python_ints(value, want):
    got = as_int(value)
    assert got == want and type(got) is int and not is_bool(value)


@pytest.mark.parametrize("value", [2.5, 3.0, np.float32(3.0), "3", None, torch.tensor(3.0), torch.tensor([1, 2]),
                                   [3]],
                         ids=["float", "integral-float", "numpy-float", "string", "none", "float-tensor",
                              "two-element-tensor", "list"])
def test_non_integers_read_as_none(value):
    assert as_int(value) is None


@pytest.mark.parametrize("value, want", [
    pytest.param(0.5, 0.5, id="float"), pytest.param(2, 2.0, id="int"), pytest.param(np.float32(0.5), 0.5, id="numpy"),
    pytest.param(torch.tensor(0.25), 0.25, id="tensor"), pytest.param(torch.tensor([1 + 1j]), None, id="complex"),
    pytest.param(torch.ones(2), None, id="two-elements"), pytest.param("0.5", None, id="string"),
])
def test_reals(value, want):
    assert as_real(value) == want
