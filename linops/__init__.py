"""linops: matrix-free linear algebra for studying how neural networks train."""

from linops.base import IdentityOperator, TorchLinearOperator, aslinearoperator
from linops.distributed import DistributedError, dense_columns, shard, shared_seed
from linops.hessian import GGNOperator, HessianOperator, OutputHessianOperator
from linops.jacobian import JacobianOperator, NTKOperator
from linops.params import ParamSpace
from linops.training import TrainingJacobianOperator

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
    # data-parallel operators on torch.distributed (process_group=...)
    "DistributedError",
    "dense_columns",
    "shard",
    "shared_seed",
    # training Jacobian (seed 004)
    "TrainingJacobianOperator",
]
