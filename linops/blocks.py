"""Building blocks for matrix-free estimators on top of linops (a documented interface).

What the stochastic estimators of ``estimators`` (trace, diagonal, density, counting, matrix
functions) share with linops' own Krylov solvers, so that they never import a private linops
module:

* :func:`prepare` turns any operator, dense array or SciPy operator into a
  :class:`linops.TorchLinearOperator` and remembers which array kind to return
  (:func:`to_output`);
* :func:`make_generator` turns a ``seed`` (``int | torch.Generator | None``) into a generator
  on the operator's device, :func:`random_block` draws Gaussian or Rademacher probe blocks from
  it, :func:`orth_qr` orthonormalises a block robustly;
* :func:`column_dots` gives the inner products of matching columns, summed in double;
* :func:`column_norms` gives column norms of a block to the dtype's rounding (``vector_norm``
  along a block's columns loses about 3e-5 relative in float32 here), :func:`residual_norms`
  those of ``A Y - Y diag(vals)`` summed in double by chunks of rows;
* :func:`check_symmetric` probes an operator for symmetry once (``SYMMETRY_PROBES`` products,
  none for one that declares ``is_symmetric``);
* :func:`check_int`, :func:`check_products`, :func:`check_which` validate the arguments with
  the toolkit's ``"name: expected ..., got ..."`` messages.
"""

from linops._krylov import (
    SYMMETRY_PROBES,
    check_int,
    check_products,
    check_symmetric,
    check_which,
    column_dots,
    column_norms,
    make_generator,
    orth_qr,
    prepare,
    random_block,
    residual_norms,
    to_output,
)

__all__ = [
    "SYMMETRY_PROBES",
    "check_int",
    "check_products",
    "check_symmetric",
    "check_which",
    "column_dots",
    "column_norms",
    "make_generator",
    "orth_qr",
    "prepare",
    "random_block",
    "residual_norms",
    "to_output",
]
