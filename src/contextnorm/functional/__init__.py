"""Functional core of the context-normalization layers: pure tensor functions.

Every layer in :mod:`contextnorm.layers` is a thin module over these functions, as
``torch.nn.BatchNorm2d`` sits on ``torch.nn.functional.batch_norm``.

The layers share one computational pattern, which is what keeps them fast whatever the
number of contexts ``K``:

1. one pass over the activations gives per-sample, per-channel moments (N, C);
2. every statistic a layer needs (per context, per mode, BN/LN/IN) is a small weighted
   combination of those moments, computed with matrix products on (N, C) and (K, C)
   tensors, never with a Python loop over contexts;
3. one more pass applies a per-sample affine map ``y = x * scale[n, c] + shift[n, c]``.

The mixture layers (ACN, MixNorm) need a posterior per position, so they work on a
positions view of the activations instead, again with matrix products over components.

Shapes: ``x`` is (N, C), (N, C, *spatial) or, with ``channel_last=True``, (N, *, C).
Internally it is viewed as (N, C, L) without copying where the layout allows.
"""

from .context import context_norm, context_norm_x, sample_log_posterior
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
    Moments,
    affine_coefficients,
    apply_sample_affine,
    as_ncl,
    pooled_moments,
    sample_moments,
    update_running_moments,
)

__all__ = [
    "as_ncl",
    "Moments",
    "sample_moments",
    "pooled_moments",
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
    "fit_diag_gmm",
    "kmeans_plus_plus",
    "match_components",
    "context_norm",
    "context_norm_x",
    "update_running_moments",
]

