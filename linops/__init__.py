"""linops: matrix-free linear algebra for studying how neural networks train."""

from linops.base import IdentityOperator, TorchLinearOperator, aslinearoperator

__all__ = [
    # operator core
    "IdentityOperator",
    "TorchLinearOperator",
    "aslinearoperator",
]
