"""trainers: training loops that produce what the toolkit studies."""

from trainers._base import Callback, History, RelativeDistance, Trainer, make_optimizer
from trainers.backprop import BackpropTrainer
from trainers.forward import ForwardGradientTrainer, GuessCosine
from trainers.linearized import LinearizedTrainer
from trainers.lowrank import LowRankFactors, LowRankJacobianTrainer, lowrank_factors

__all__ = [
    # shared interface
    "Callback",
    "History",
    "RelativeDistance",
    "Trainer",
    "make_optimizer",
    # trainers
    "BackpropTrainer",
    "LinearizedTrainer",
    "LowRankJacobianTrainer",
    "LowRankFactors",
    "lowrank_factors",
    # seed 003: forward-gradient training
    "ForwardGradientTrainer",
    "GuessCosine",
]
