"""estimators: stochastic estimators and model-analysis quantities."""

from estimators.guesses import (
    GUESSERS,
    ActivationMixing,
    ActivationPerturbation,
    DirectionalDescent,
    Downstream,
    GradientGuesser,
    Guess,
    MatchedCosine,
    SelfSharpening,
    WTranspose,
    make_guesser,
)
from estimators.reference import (
    STRATEGIES,
    RankCurve,
    ReferenceGram,
    exact_jacobian_rank,
    jacobian_column_norms,
    rank_curve,
    reference_gram_eigh,
    reference_jacobian,
    reference_rank,
    select_reference_set,
)

__all__ = [
    # seed 003: gradient guessers
    "GUESSERS",
    "ActivationMixing",
    "ActivationPerturbation",
    "DirectionalDescent",
    "Downstream",
    "GradientGuesser",
    "Guess",
    "MatchedCosine",
    "SelfSharpening",
    "WTranspose",
    "make_guesser",
    # seed 000: reference-set Jacobians and low-rank checks
    "STRATEGIES",
    "RankCurve",
    "ReferenceGram",
    "exact_jacobian_rank",
    "jacobian_column_norms",
    "rank_curve",
    "reference_gram_eigh",
    "reference_jacobian",
    "reference_rank",
    "select_reference_set",
]
