"""linops: matrix-free linear algebra for studying how neural networks train."""

from linops.base import IdentityOperator, TorchLinearOperator, aslinearoperator
from linops.hessian import GGNOperator, HessianOperator, OutputHessianOperator
from linops.jacobian import JacobianOperator, NTKOperator
from linops.params import ParamSpace

__all__ = [
    # operator core
    "IdentityOperator",
    "TorchLinearOperator",
    "aslinearoperator",
    "ParamSpace",
    # model operators
    "JacobianOperator",
    "NTKOperator",
    "HessianOperator",
    "GGNOperator",
    "OutputHessianOperator",
]
