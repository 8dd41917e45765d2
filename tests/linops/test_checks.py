"""linops._checks: every helper accepts what it should and refuses the rest with a message
"name: expected ..., got ..." naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linops import _checks as ck


def test_check_int_bounds_and_types() -> None:
    assert (
        ck.check_int(np.int64(3), "k", 1, 3) == 3 and type(ck.check_int(np.int64(3), "k", 1)) is int
    )
    for bad in (0, 4, True, 2.0, "2", None):
        with pytest.raises(ValueError, match=r"^k: expected an integer >= 1 and <= 3, got "):
            ck.check_int(bad, "k", 1, 3)
    with pytest.raises(ValueError, match=r"^ncv: expected an integer >= 2, got 1$"):
        ck.check_int(1, "ncv", 2)


def test_check_positive_and_positive_or_none() -> None:
    assert ck.check_positive(np.int32(5), "workers") == 5
    for bad in (0, -1, 1.5, None, True):
        with pytest.raises(ValueError, match=r"^workers: expected a positive integer, got "):
            ck.check_positive(bad, "workers")
    assert ck.check_positive_or_none(None, "max_vectors") is None
    assert ck.check_positive_or_none(7, "max_vectors") == 7
    for bad in (0, 2.5, "3"):
        with pytest.raises(ValueError, match=r"^max_vectors: expected a positive integer or None"):
            ck.check_positive_or_none(bad, "max_vectors")


def test_check_positive_number() -> None:
    assert ck.check_positive_number(np.float32(0.5), "tol") == 0.5
    assert ck.check_positive_number(float("inf"), "tol") == float("inf")
    for bad in (0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match=r"^tol: expected a positive number, got "):
            ck.check_positive_number(bad, "tol")


def test_check_which_and_rtol() -> None:
    assert ck.check_which("LA", ("LA", "SA")) == "LA"
    with pytest.raises(ValueError, match=r"^which: expected one of \('LA', 'SA'\), got 'LM'$"):
        ck.check_which("LM", ("LA", "SA"))
    with pytest.raises(ValueError, match=r"^method: expected one of"):
        ck.check_which("x", ("cg",), "method")
    assert ck.check_rtol(0) == 0.0 and ck.check_rtol(0.5) == 0.5
    for bad in (1.0, -0.1, "0.1", None):
        with pytest.raises(ValueError, match=r"^rtol: expected a number in \[0, 1\), got "):
            ck.check_rtol(bad)


def test_check_shape_and_square() -> None:
    assert ck.check_shape([np.int64(2), 3]) == (2, 3)
    for bad in ((2,), (2, -1), (2.0, 3), (1, 2, 3)):
        with pytest.raises(ValueError, match=r"^shape: expected two non-negative integers, got "):
            ck.check_shape(bad)
    assert ck.check_square((4, 4)) == 4 and ck.check_square((0, 0)) == 0
    with pytest.raises(
        ValueError, match=r"^A: expected a square \(symmetric\) operator, got shape"
    ):
        ck.check_square((3, 4))
    with pytest.raises(ValueError, match=r"^B: expected a square \(PSD\) operator"):
        ck.check_square((3, 4), "B", "PSD")
    with pytest.raises(ValueError, match=r"^A: expected a non-empty operator, got shape \(0, 0\)$"):
        ck.check_square((0, 0), nonempty=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
def test_check_finite(dtype: torch.dtype) -> None:
    ck.check_finite(torch.ones(3, dtype=dtype), "x")
    ck.check_finite(torch.empty(0, dtype=dtype), "x")
    big = torch.full((4,), torch.finfo(torch.float32).max, dtype=torch.float32)
    ck.check_finite(big, "x")  # the sum overflows, the entries are finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.tensor([1.0, bad, 2.0], dtype=dtype)
        with pytest.raises(ValueError, match=r"^x: contains NaN or inf$"):
            ck.check_finite(t, "x")
        with pytest.raises(ValueError, match=r"^data: targets contain NaN or inf$"):
            ck.check_finite(t, "data", "targets")
    ck.check_finite(torch.tensor([1, 2]), "x")  # integers are always finite


def test_check_dtype_and_device() -> None:
    assert ck.check_dtype(torch.float32) is torch.float32
    assert (
        ck.check_dtype("float64") is torch.float64
        and ck.check_dtype(np.complex64) is torch.complex64
    )
    with pytest.raises(
        TypeError, match=r"^dtype: expected a floating torch dtype, got torch.int64$"
    ):
        ck.check_dtype(torch.int64)
    with pytest.raises(TypeError, match=r"^dtype: expected a floating torch dtype such as"):
        ck.check_dtype("not a dtype")
    assert ck.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^device: expected a torch device such as 'cpu', got"):
        ck.check_device("nowhere")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: expected an available device, got 'cuda'"):
            ck.check_device("cuda")


def test_check_output_index() -> None:
    assert ck.check_output_index(None, 3, optional=True) is None
    assert ck.check_output_index(np.int64(2), 3, optional=False) == 2
    with pytest.raises(TypeError, match=r"^output_index: expected an integer, got NoneType$"):
        ck.check_output_index(None, 3, optional=False)
    with pytest.raises(TypeError, match=r"^output_index: expected an integer, got bool$"):
        ck.check_output_index(True, 3, optional=True)
    with pytest.raises(ValueError, match=r"^output_index: expected an integer in \[0, 2\], got 3$"):
        ck.check_output_index(3, 3, optional=True)
