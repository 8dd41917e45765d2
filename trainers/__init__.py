"""trainers: training loops that produce what the toolkit studies."""

from trainers._base import (
    Callback,
    Direction,
    History,
    RelativeDistance,
    Trainer,
    make_optimizer,
)
from trainers.backprop import BackpropTrainer
from trainers.forward import ForwardGradientTrainer, GuessCosine
from trainers.functional import DataSchedule, TrainingRun
from trainers.linearized import LinearizedTrainer
from trainers.lowrank import LowRankFactors, LowRankJacobianTrainer, LowRankUpdate, lowrank_factors
from trainers.subspace import SubspaceTrainer, subspace_basis

__all__ = [
    # shared interface
    "Callback",
    "Direction",
    "History",
    "RelativeDistance",
    "Trainer",
    "make_optimizer",
    # trainers
    "BackpropTrainer",
    "LinearizedTrainer",
    "LowRankJacobianTrainer",
    "LowRankFactors",
    "LowRankUpdate",
    "lowrank_factors",
    # forward-gradient training ("How to Guess a Gradient", arXiv:2312.04709)
    "ForwardGradientTrainer",
    "GuessCosine",
    # differentiable training runs and subspace training ("Understanding Gradient Descent
    # through the Training Jacobian")
    "DataSchedule",
    "TrainingRun",
    "SubspaceTrainer",
    "subspace_basis",
]
