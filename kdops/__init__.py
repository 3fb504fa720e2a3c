"""kdops: fused kernels for knowledge-distillation losses in semantic segmentation.

Every op takes ``backend=`` ("auto", "reference", "triton", "cuda", "cpu"; default
``$KDOPS_BACKEND`` or "auto"); see :mod:`kdops.backend`.
"""
from kdops.backend import BACKENDS, BackendUnavailableError
from kdops.ops.attention import (
    attention_loss,
    attention_map,
    class_attention_loss,
    class_attention_map,
)
from kdops.ops.correlation import (
    channel_correlation,
    channel_correlation_loss,
    pairwise_affinity_loss,
)
from kdops.ops.prototypes import class_variation_loss, prototype_kl, prototype_pool
from kdops.ops.softmax_kl import channel_kl, pixel_kl

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "attention_loss",
    "attention_map",
    "channel_correlation",
    "channel_correlation_loss",
    "channel_kl",
    "class_attention_loss",
    "class_attention_map",
    "class_variation_loss",
    "pairwise_affinity_loss",
    "pixel_kl",
    "prototype_kl",
    "prototype_pool",
]
