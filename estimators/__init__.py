"""estimators: stochastic estimators and model-analysis quantities."""

from estimators.blockwise import BlockSpectrum, BlockwiseSpectra, blockwise_spectra, js_distance
from estimators.counting import SingularValueCount, singular_value_count
from estimators.density import SpectralDensity, spectral_density
from estimators.diagonal import NormEstimate, frobenius_norm, xdiag
from estimators.dimension import DimensionResult, training_dimension, training_dimension_dense
from estimators.functions import (
    QuadratureBounds,
    SLQEstimate,
    logdet,
    logdet_bounds,
    quadratic_form_bounds,
    trace_function,
)
from estimators.guess_bias import (
    BiasAnalysis,
    GuessCovarianceOperator,
    GuessNoiseOperator,
    guess_bias,
)
from estimators.guess_quality import (
    ActivationGradientOverlap,
    CosineSaturation,
    CosineSimilarity,
    OneStep,
    TrueGradient,
    activation_gradient_overlap,
    cosine_saturation,
    guess_cosine,
    one_step_effectiveness,
    true_gradient,
)
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
from estimators.jacobian_rank import exact_jacobian_rank
from estimators.kernel import (
    GramDrift,
    GramSpectrum,
    RelativeDistances,
    gram_drift,
    gram_extremes,
    gram_operator,
    layer_parameter_names,
    relative_distance,
)
from estimators.laziness import (
    HessianNorm,
    JacobianDrift,
    LazinessResult,
    hessian_norm,
    jacobian_drift,
    laziness_ratio,
)
from estimators.perturbation import (
    LinearityResult,
    OODInputs,
    bulk_overlap,
    kl_perturbation,
    linearity_test,
    ood_inputs,
    parameter_function_jacobian,
    random_subspace_similarity,
)
from estimators.reference import (
    RankCurve,
    ReferenceGram,
    eigenvalue_threshold,
    rank_curve,
    reference_gram_eigh,
    reference_jacobian,
    reference_rank,
)
from estimators.seeding import Seed, make_generator
from estimators.selection import STRATEGIES, jacobian_column_norms, select_reference_set
from estimators.spectrum import (
    RegionCounts,
    RegionRow,
    TrainingJacobianSVD,
    bulk_order,
    left_right_cosine,
    region_table,
    spectral_regions,
    svd_training_jacobian,
    top_singular_values,
)
from estimators.trace import (
    DiagonalEstimate,
    TraceEstimate,
    diagonal,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
)

__all__ = [
    # the one meaning of seed
    "Seed",
    "make_generator",
    # counting singular values above a threshold
    "SingularValueCount",
    "singular_value_count",
    # gradient guessers ("How to Guess a Gradient", arXiv:2312.04709)
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
    # reference-set Jacobians and low-rank checks ("Leveraging Low Rank Structure in the Lazy
    # Regime", anonymous ICLR 2025 submission)
    "STRATEGIES",
    "RankCurve",
    "ReferenceGram",
    "eigenvalue_threshold",
    "exact_jacobian_rank",
    "jacobian_column_norms",
    "rank_curve",
    "reference_gram_eigh",
    "reference_jacobian",
    "reference_rank",
    "select_reference_set",
    # guess quality and bias ("How to Guess a Gradient")
    "ActivationGradientOverlap",
    "BiasAnalysis",
    "CosineSaturation",
    "CosineSimilarity",
    "GuessCovarianceOperator",
    "GuessNoiseOperator",
    "OneStep",
    "TrueGradient",
    "activation_gradient_overlap",
    "cosine_saturation",
    "guess_bias",
    "guess_cosine",
    "one_step_effectiveness",
    "true_gradient",
    # laziness ratio and Jacobian drift ("Leveraging Low Rank Structure in the Lazy Regime")
    "HessianNorm",
    "JacobianDrift",
    "LazinessResult",
    "hessian_norm",
    "jacobian_drift",
    "laziness_ratio",
    # Gram matrices, their drift, relative distance ("Demystifying Lazy Training of Neural
    # Networks from a Macroscopic Viewpoint", arXiv:2404.04859)
    "GramDrift",
    "GramSpectrum",
    "RelativeDistances",
    "gram_drift",
    "gram_extremes",
    "gram_operator",
    "layer_parameter_names",
    "relative_distance",
    # trace, diagonal and spectral-density estimation
    "DiagonalEstimate",
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "spectral_density",
    "xtrace",
    # blockwise Hessian spectra and their JS distance ("Why Transformers Need Adam", arXiv:2402.16788)
    "BlockSpectrum",
    "BlockwiseSpectra",
    "blockwise_spectra",
    "js_distance",
    # matrix functions, quadrature bounds, XDiag, Frobenius norm (issue 23)
    "NormEstimate",
    "QuadratureBounds",
    "SLQEstimate",
    "frobenius_norm",
    "logdet",
    "logdet_bounds",
    "quadratic_form_bounds",
    "trace_function",
    "xdiag",
    # training-Jacobian spectrum ("Understanding Gradient Descent through the Training
    # Jacobian", anonymous submission)
    "DimensionResult",
    "LinearityResult",
    "OODInputs",
    "RegionCounts",
    "RegionRow",
    "TrainingJacobianSVD",
    "bulk_order",
    "bulk_overlap",
    "kl_perturbation",
    "left_right_cosine",
    "linearity_test",
    "ood_inputs",
    "parameter_function_jacobian",
    "random_subspace_similarity",
    "region_table",
    "spectral_regions",
    "svd_training_jacobian",
    "top_singular_values",
    "training_dimension",
    "training_dimension_dense",
]
