"""jcce: exact, NaN-free, fused cross-entropy losses for JAX.

Import from ``jcce`` only; the underscore modules are private and may change.
"""

from jcce import adaptive_softmax as adaptive_softmax
from jcce import calibration as calibration
from jcce import samplers as samplers
from jcce._backend import use_implementation as use_implementation
from jcce._binary import binary_cross_entropy as binary_cross_entropy
from jcce._binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jcce._binary import sigmoid_focal_loss as sigmoid_focal_loss
from jcce._contrastive import info_nce_loss as info_nce_loss
from jcce._contrastive import ntxent as ntxent
from jcce._divergence import convex_kl_divergence as convex_kl_divergence
from jcce._divergence import generalized_kl_divergence as generalized_kl_divergence
from jcce._divergence import kl_divergence as kl_divergence
from jcce._divergence import (
    kl_divergence_with_log_targets as kl_divergence_with_log_targets,
)
from jcce._divergence import smooth_labels as smooth_labels
from jcce._family import generalized_cross_entropy as generalized_cross_entropy
from jcce._family import poly_loss_cross_entropy as poly_loss_cross_entropy
from jcce._family import symmetric_cross_entropy as symmetric_cross_entropy
from jcce._linear import linear_cross_entropy as linear_cross_entropy
from jcce._losses import cross_entropy as cross_entropy
from jcce._losses import entropy as entropy
from jcce._losses import ranking_softmax_loss as ranking_softmax_loss
from jcce._losses import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from jcce._losses import softmax_cross_entropy as softmax_cross_entropy
from jcce._losses import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jcce._sampled import nce_loss as nce_loss
from jcce._sampled import (
    sampled_softmax_cross_entropy as sampled_softmax_cross_entropy,
)
from jcce._transforms import Chain as Chain
from jcce._transforms import Transform as Transform
from jcce._transforms import chain as chain
from jcce._transforms import class_weights as class_weights
from jcce._transforms import focal as focal
from jcce._transforms import generalized as generalized
from jcce._transforms import label_smoothing as label_smoothing
from jcce._transforms import log_base as log_base
from jcce._transforms import poly as poly
from jcce._transforms import softcap as softcap
from jcce._transforms import symmetric as symmetric
from jcce._transforms import temperature as temperature
from jcce._transforms import z_loss as z_loss
from jcce._validate import checks as checks

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "Transform",
    "adaptive_softmax",
    "binary_cross_entropy",
    "calibration",
    "chain",
    "checks",
    "class_weights",
    "convex_kl_divergence",
    "focal",
    "generalized",
    "info_nce_loss",
    "generalized_cross_entropy",
    "generalized_kl_divergence",
    "poly",
    "poly_loss_cross_entropy",
    "symmetric",
    "symmetric_cross_entropy",
    "cross_entropy",
    "entropy",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "label_smoothing",
    "linear_cross_entropy",
    "log_base",
    "nce_loss",
    "ntxent",
    "ranking_softmax_loss",
    "safe_softmax_cross_entropy",
    "sampled_softmax_cross_entropy",
    "samplers",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softcap",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "temperature",
    "use_implementation",
    "z_loss",
]
