"""``check_operator`` says which checks it skipped and why (issue 18, item 6)."""

from __future__ import annotations

import math

import pytest
import torch

import linops
from linops.testing import CheckReport, check_operator

F64 = torch.float64


def _mat(m: int, n: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=F64)


def test_every_law_runs_on_a_small_symmetric_operator() -> None:
    A = _mat(4, 4)
    op = linops.aslinearoperator(A + A.T)
    op.is_symmetric = True
    report = check_operator(op)
    assert report.skipped == {}
    assert all(math.isfinite(getattr(report, law)) for law in report._fields[:-1])
    assert "skipped" not in str(report)


def test_skipped_checks_are_named_with_their_reason() -> None:
    report = check_operator(_mat(4, 3), max_dense_size=2)
    assert set(report.skipped) == {"symmetry", "dense"}
    assert math.isnan(report.symmetry) and math.isnan(report.dense)
    assert "does not claim is_symmetric" in report.skipped["symmetry"]
    assert "3 columns > max_dense_size=2" in report.skipped["dense"]
    assert "pass dense= or a larger max_dense_size" in report.skipped["dense"]
    text = str(report)
    assert "dense: skipped (no dense matrix given" in text
    assert "symmetry: skipped (the operator does not claim is_symmetric)" in text
    assert "adjoint: relative error" in text


def test_a_given_dense_matrix_is_checked_whatever_the_size() -> None:
    A = _mat(4, 3)
    report = check_operator(A, dense=A, max_dense_size=1)
    assert "dense" not in report.skipped and report.dense < 1e-13
    with pytest.raises(AssertionError, match="dense agreement: products differ"):
        check_operator(A, dense=2 * A, max_dense_size=1)


def test_reports_built_by_hand_default_to_nothing_skipped() -> None:
    assert CheckReport(0.0, 0.0, 0.0, 0.0, 0.0).skipped == {}
