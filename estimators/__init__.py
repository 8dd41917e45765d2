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
]
