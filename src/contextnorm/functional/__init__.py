"""Functional core of the context-normalization layers: pure tensor functions.

Every layer in :mod:`contextnorm.layers` is a thin module over these functions, as
``torch.nn.BatchNorm2d`` sits on ``torch.nn.functional.batch_norm``.

The layers share one computational pattern, which is what keeps them fast whatever the
number of contexts ``K``:

1. one pass over the activations gives per-sample, per-channel moments (N, C)
   (:func:`sample_moments`);
2. every statistic a layer needs (per context, per mode, BN/LN/IN) is a small weighted
   combination of those moments: sufficient statistics (count, shifted sum, shifted sum of
   squares) per group (:func:`group_sums`), summable across processes, turned into means
   and variances (:func:`group_moments`); scatters and matrix products on (N, C) and (K, C)
   tensors, never a Python loop over contexts;
3. one more pass applies a per-sample affine map ``y = x * scale[n, c] + shift[n, c]``
   (:func:`affine_coefficients`, :func:`apply_sample_affine`).

The mixture layers (ACN, MixNorm) need a posterior per position, so they work on a
positions view of the activations instead, again with matrix products over components.

On the CPU, the hot steps run as native kernels compiled on first use
(:mod:`~contextnorm.functional.native`); the PyTorch code here is their reference and runs
everywhere else.

Shapes: ``x`` is (N, C), (N, C, *spatial) or, with ``channel_last=True``, (N, *, C).
Internally it is viewed as (N, C, L) without copying where the layout allows.
"""

from .context import (
    context_affine,
    context_batch_norm,
    learned_context_affine,
    learned_statistics,
    sample_log_posterior,
)
from .mixture import (
    MixtureStats,
    batch_mixture_norm,
    channels_inner,
    component_sums,
    diag_gaussian_log_density,
    expand_components,
    fit_diag_gmm,
    from_positions_view,
    kmeans_plus_plus,
    log_joint,
    log_joint_coefficients,
    match_components,
    mixture_transform,
    positions_view,
    sample_positions,
)
from .moments import (
    GroupSums,
    Moments,
    affine_coefficients,
    apply_sample_affine,
    as_ncl,
    cast,
    group_moments,
    group_sums,
    packed_moments,
    packed_sums,
    pooled_moments,
    running_rate,
    sample_moments,
    statistics_dtype,
    update_running_moments,
    without_autocast,
)
from .sync import agree_across_processes, all_reduce_sum, synced_pooled_moments

__all__ = [
    "as_ncl",
    "statistics_dtype",
    "cast",
    "without_autocast",
    "Moments",
    "sample_moments",
    "GroupSums",
    "group_sums",
    "group_moments",
    "pooled_moments",
    "packed_sums",
    "packed_moments",
    "affine_coefficients",
    "apply_sample_affine",
    "MixtureStats",
    "positions_view",
    "from_positions_view",
    "sample_positions",
    "channels_inner",
    "component_sums",
    "expand_components",
    "log_joint_coefficients",
    "log_joint",
    "diag_gaussian_log_density",
    "sample_log_posterior",
    "batch_mixture_norm",
    "mixture_transform",
    "context_affine",
    "context_batch_norm",
    "learned_context_affine",
    "learned_statistics",
    "fit_diag_gmm",
    "kmeans_plus_plus",
    "match_components",
    "running_rate",
    "update_running_moments",
    "all_reduce_sum",
    "synced_pooled_moments",
    "agree_across_processes",
]
