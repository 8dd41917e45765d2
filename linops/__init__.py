"""linops: matrix-free linear algebra for studying how neural networks train."""

from importlib import metadata as _metadata

from linops._defects import KNOWN_DEFECTS, TorchDefect, workarounds
from linops._types import (
    Array,
    ArrayLike,
    Data,
    LossFunction,
    OperatorLike,
    OutputSelector,
    Params,
    Seed,
)
from linops.angles import principal_angles, subspace_similarity, subspace_similarity_curve
from linops.base import IdentityOperator, TorchLinearOperator, aslinearoperator
from linops.distributed import DistributedError, dense_columns, shard, shared_seed
from linops.ekfac import EKFACOperator
from linops.fisher import EmpiricalFisherOperator, FisherOperator
from linops.hessian import GGNOperator, HessianOperator, OutputHessianOperator
from linops.inverse import (
    InverseNoConvergence,
    InverseOperator,
    InverseResult,
    NystromPreconditioner,
    inverse,
    nystrom_preconditioner,
)
from linops.jacobian import JacobianOperator, NTKOperator
from linops.kfac import KFACOperator
from linops.lanczos import LanczosNoConvergence, LanczosResult, lanczos
from linops.memory import retain_freed_memory
from linops.params import ParamSpace
from linops.randomized import (
    EighResult,
    RandomizedSVDResult,
    RangeFinderResult,
    nystrom,
    randomized_eigh,
    randomized_svd,
    range_finder,
)
from linops.rank import effective_rank, numerical_rank, stable_rank
from linops.svds import SVDSNoConvergence, SVDSResult, svds
from linops.training import TrainingJacobianOperator

try:
    __version__ = _metadata.version("linops")  # single-sourced from the package metadata
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    # operator core
    "IdentityOperator",
    "TorchLinearOperator",
    "aslinearoperator",
    "ParamSpace",
    "retain_freed_memory",
    # torch's derivative defects the operators work around (linops/_defects.py)
    "KNOWN_DEFECTS",
    "TorchDefect",
    "workarounds",
    # model operators
    "JacobianOperator",
    "NTKOperator",
    "HessianOperator",
    "GGNOperator",
    "OutputHessianOperator",
    # the Fisher family (issue 23)
    "EmpiricalFisherOperator",
    "FisherOperator",
    "KFACOperator",
    "EKFACOperator",
    # data-parallel operators on torch.distributed (process_group=...)
    "DistributedError",
    "dense_columns",
    "shard",
    "shared_seed",
    # training Jacobian ("Understanding Gradient Descent through the Training Jacobian")
    "TrainingJacobianOperator",
    # matrix-free linear algebra
    "lanczos",
    "LanczosResult",
    "LanczosNoConvergence",
    "svds",
    "SVDSResult",
    "SVDSNoConvergence",
    "range_finder",
    "randomized_svd",
    "randomized_eigh",
    "nystrom",
    "RangeFinderResult",
    "RandomizedSVDResult",
    "EighResult",
    "principal_angles",
    "subspace_similarity",
    "subspace_similarity_curve",
    "numerical_rank",
    "effective_rank",
    "stable_rank",
    # damped inverses as operators (issue 23)
    "inverse",
    "InverseOperator",
    "InverseResult",
    "InverseNoConvergence",
    "nystrom_preconditioner",
    "NystromPreconditioner",
    # the types of the signatures (linops/_types.py says what each admits)
    "Array",
    "ArrayLike",
    "OperatorLike",
    "Seed",
    "Params",
    "Data",
    "LossFunction",
    "OutputSelector",
]
