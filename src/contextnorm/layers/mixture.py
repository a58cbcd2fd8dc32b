"""Unsupervised mixture layers: ACN (learned mixture) and the MixNorm baseline (EM per batch).

Both model the channel vector ``x_i`` of each position as a draw from a K-component diagonal
Gaussian mixture ``{lambda_k, m_k, Sigma_k}`` and, in training, normalise with the
posterior-weighted transform ([CBN] Eq. 5-9, [PKN] Eq. 17-21;
:func:`contextnorm.functional.batch_mixture_norm`):

``tau_k(x_i) = lambda_k N(x_i | m_k, Sigma_k) / sum_j lambda_j N(x_i | m_j, Sigma_j)``,
``mu_k = sum_i tau_k(x_i) x_i / sum_i tau_k(x_i)``, ``v_k`` the same weighted mean of
``(x_i - mu_k)^2``, and
``y_i = weight * sum_k tau_k(x_i) g_k (x_i - mu_k) / sqrt(v_k + eps) + bias``
with ``g_k = 1/sqrt(lambda_k)`` when ``prior_scaling`` is on, 1 otherwise.

They differ in where the mixture comes from: ACN learns it (by gradient, or by an online-EM
momentum update), MixNorm fits it to every training batch by EM. In eval mode both
normalise with running estimates of the ``mu_k, v_k`` (and weights) that training used, as
BatchNorm does, so that inference computes what training computed.

References:
    [CBN] B. Faye, H. Azzag, M. Lebbah. Cluster-Based Normalization Layer for Neural Networks.
        arXiv:2403.16798v2, 2024. Its UCB-Norm is ACN here.
    [PKN] B. Faye, H. Azzag, M. Lebbah, D. Bouchaffra. Enhancing Neural Network Representations
        with Prior Knowledge-Based Normalization. arXiv:2403.16798v3, 2024.
    [MN] M. M. Kalayeh, M. Shah. Training Faster by Separating Modes of Variation in
        Batch-normalized Models. arXiv:1806.02892, 2018 (IEEE TPAMI 42(6), 2019).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .. import functional as F
from .base import (
    _SOFTPLUS_OF_ONE,
    NormBase,
    check_agreement,
    check_count,
    check_momentum,
    inverse_softplus,
    renamed_count,
)

__all__ = ["AdaptiveContextNorm", "MixtureNorm"]

_UPDATE_MODES = ("gradient", "momentum")
_INFERENCE_MODES = ("running", "mixture")
_TINY_PRIOR = 1e-12


@contextlib.contextmanager
def _exact_math(device: torch.device) -> Iterator[None]:
    """Autocast off: ``@`` and ``matmul`` are autocast ops and would lower the widened tensors."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


def _snapshot(buffer: Tensor) -> Tensor:
    """The value of a buffer that this forward reads for its gradient, then updates in place.

    In eager mode, the buffer itself. Under ``torch.compile``, AOTAutograd's partitioner may
    recompute cheap functions of a graph input in the backward instead of saving them, and it
    does so even for an input the forward mutates, so the backward would read the updated
    value (silently wrong gradients; pytorch/pytorch pull request 197039). A matrix product is
    never recomputed: its result, a copy of the buffer, is saved instead.
    """
    if not torch.compiler.is_compiling():
        return buffer
    return torch.mm(buffer.new_ones(1, 1), buffer.reshape(1, -1)).view_as(buffer)


class _PositionMixture(NormBase):
    """What ACN and MixNorm share: arguments, running estimates, the positions view, diagnostics.

    Running state, all (K, ...) buffers updated in training without host synchronisation:
    ``running_prior`` (K,), the share of the positions' posterior mass per component;
    ``running_mean``, ``running_var`` (K, C), the posterior-weighted batch means and
    (unbiased) variances that training normalised with; ``running_entropy`` (), the mean
    posterior entropy per position in nats; ``num_batches_tracked``.

    Each estimate moves towards the batch's value at rate ``momentum``, as in BatchNorm (the
    running mean of the statistics training used, whatever each batch's share); a component
    with fewer than two effective positions in the batch (``M^2 / sum tau^2 < 2``: no variance
    to learn from) keeps its means and variances, as a context absent from a batch does in CN.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        variance_floor: float,
        prior_scaling: bool,
        channel_last: bool,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_last)
        self.num_contexts = num_contexts
        self.momentum = check_momentum(momentum, allow_none=True)
        if (
            isinstance(variance_floor, bool)
            or not isinstance(variance_floor, (int, float))
            or not 0 <= variance_floor < 1
        ):
            raise ValueError(
                "variance_floor must be a fraction of the batch's variance in [0, 1), "
                f"got {variance_floor!r}"
            )
        self.variance_floor = float(variance_floor)
        self.prior_scaling = bool(prior_scaling)
        self._init_affine((num_features,))

    def _init_running(self, track: bool) -> None:
        self.track_running_stats = bool(track)
        k, c = self.num_contexts, self.num_features
        if track:
            self.register_buffer("running_prior", torch.full((k,), 1.0 / k))
            self.register_buffer("running_mean", torch.zeros(k, c))
            self.register_buffer("running_var", torch.ones(k, c))
            self.register_buffer("running_entropy", torch.zeros(()))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            for name in (
                "running_prior",
                "running_mean",
                "running_var",
                "running_entropy",
                "num_batches_tracked",
            ):
                self.register_buffer(name, None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_prior.fill_(1.0 / self.num_contexts)
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.running_entropy.zero_()
            self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, context: object = None) -> Tensor:
        """Normalise ``x`` (N, C, *) or, with ``channel_last``, (N, *, C). ``context`` is ignored.

        The mixture math runs in float32 (float64 for float64 input) with autocast off,
        whatever the dtype of the parameters and buffers (they are cast to it, and the running
        estimates are written back in their own dtype); the output has the input's dtype, as
        BatchNorm's.
        """
        # A synchronised layer joins its collectives whatever its batch holds (none at all too).
        if x.numel() == 0 and self._statistics_group() is None:
            return self._empty_output(x)
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        view = F.positions_view(x3)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with _exact_math(x.device):
            out = self._normalize(view.to(dtype))
        return restore(F.from_positions_view(out, x3.shape[0], x3.shape[2])).to(x.dtype)

    def _empty_output(self, x: Tensor) -> Tensor:
        """An empty batch, as BatchNorm: an empty output (gradients of zero), state untouched."""
        F.as_ncl(
            x.new_zeros((1, *x.shape[1:])), self.num_features, self.channel_last
        )  # layout checks
        if not self.affine:
            return x.clone()
        channel_dim = -1 if self.channel_last and x.dim() > 2 else 1
        shape = [1] * x.dim()
        shape[channel_dim] = self.num_features
        return x * self.weight.view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)

    def _normalize(self, view: Tensor) -> Tensor:
        """The normalised, affine-transformed positions view (B, C, L)."""
        raise NotImplementedError

    def _gain(self, log_prior: Tensor) -> Tensor:
        """``1/sqrt(lambda_k)`` (K,), or ones when ``prior_scaling`` is off."""
        if not self.prior_scaling:
            return torch.ones_like(log_prior)
        return torch.exp(-0.5 * log_prior)

    def _affine(self, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        if not self.affine:
            return None, None
        return self.weight.to(dtype), self.bias.to(dtype)

    def _batch_transform(
        self,
        view: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor],
        reference: Tensor,
        gain: Tensor | None,
        posterior_grad: bool,
        restart: bool = False,
    ) -> Tensor:
        """The training transform with the batch's weighted statistics; updates the running ones.

        Synchronised, the statistics are those of every process's batch.
        """
        weight, bias = self._affine(view.dtype)
        group = self._statistics_group()
        if group is not None:
            check_agreement(self, group, self.num_contexts, view.device)
        out, stats = F.batch_mixture_norm(
            view,
            *coefficients,
            self.eps,
            gain,
            weight,
            bias,
            posterior_grad=posterior_grad,
            reference=reference,
            variance_floor=self.variance_floor,
            group=group,
        )
        if self.training and self.track_running_stats:
            self._update_running(stats, restart)
        return out

    def _running_transform(
        self,
        view: Tensor,
        log_prior: Tensor,
        mean: Tensor,
        var: Tensor,
        norm_mean: Tensor,
        norm_var: Tensor,
    ) -> Tensor:
        """The eval transform: posterior under ``(log_prior, mean, var + eps)``, given statistics.

        The reference is fixed (near the data, the weighted mean of ``norm_mean``), so that a
        sample's eval output does not depend on the rest of the batch, even by rounding.
        """
        weight, bias = self._affine(view.dtype)
        reference = (log_prior.exp() @ norm_mean).detach()
        coefficients = F.log_joint_coefficients(log_prior, mean, var, reference)
        return F.mixture_transform(
            view,
            reference,
            *coefficients,
            norm_mean,
            norm_var,
            self.eps,
            self._gain(log_prior),
            weight,
            bias,
        )

    def _update_running(self, stats: F.MixtureStats, restart: bool = False) -> None:
        """Fold a training batch's statistics into the running estimates (no grad, no host sync).

        ``restart``: the first batch replaces the running estimates instead of being averaged in.
        """
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                rate = self.num_batches_tracked.reciprocal().to(self.running_prior)
            else:
                rate = torch.as_tensor(
                    self.momentum, dtype=self.running_prior.dtype, device=self.running_prior.device
                )
            if restart:
                rate = torch.where(self.num_batches_tracked == 1, 1.0, rate)
            share = (stats.mass / stats.positions).to(self.running_prior)
            # A component with (about) one position behind it has no variance to learn from.
            present = (stats.mass * stats.mass >= 2.0 * stats.mass_sq).to(self.running_prior)
            component_rate = (rate * present).unsqueeze(1)
            self.running_prior.lerp_(share, rate)
            self.running_mean.lerp_(stats.mean.to(self.running_mean), component_rate)
            self.running_var.lerp_(_unbiased(stats).to(self.running_var), component_rate)
            entropy = stats.entropy / stats.positions
            self.running_entropy.lerp_(entropy.to(self.running_entropy), rate)

    def extra_repr(self) -> str:
        parts = [
            f"{self.num_features}",
            f"num_contexts={self.num_contexts}",
            f"eps={self.eps}",
            f"momentum={self.momentum}",
            *self._extra_repr_parts(),
            f"variance_floor={self.variance_floor}",
            f"affine={self.affine}",
            f"track_running_stats={self.track_running_stats}",
            f"prior_scaling={self.prior_scaling}",
        ]
        if self.channel_last:
            parts.append("channel_last=True")
        return ", ".join(parts)

    def _extra_repr_parts(self) -> list[str]:
        return []


def _unbiased(stats: F.MixtureStats) -> Tensor:
    """The weighted variances with the reliability-weight correction ``M^2 / (M^2 - sum tau^2)``.

    With one component (every weight 1) it is BatchNorm's ``n / (n - 1)``. Components with
    fewer than two effective positions (``M^2 / sum tau^2 < 2``) are not updated at all.
    """
    mass_squared = stats.mass * stats.mass
    excess = (mass_squared - stats.mass_sq).clamp_min(torch.finfo(mass_squared.dtype).tiny)
    return stats.var * (mass_squared / excess).clamp(1.0, 2.0).unsqueeze(1)


class AdaptiveContextNorm(_PositionMixture):
    r"""Adaptive Context Normalization (ACN; UCB-Norm of [CBN]): a learned Gaussian mixture.

    Each position's channel vector ``x_i`` gets a posterior ``tau_k(x_i)`` under the mixture
    ``{lambda_k, m_k, diag(Sigma_k + eps)}``, multivariate over the channels ([CBN] Eq. 5-6),
    computed in log space. Training normalises with the posterior-weighted batch statistics
    ([CBN] Eq. 7-9, [PKN] Eq. 19-21):
    ``y_i = weight * sum_k tau_k(x_i) g_k (x_i - mu_k) / sqrt(v_k + eps) + bias``, ``v_k``
    floored at ``variance_floor`` times the batch's variance in the same channel.

    Args:
        num_features: channels ``C``.
        num_contexts: mixture components ``K`` (the former ``num_components`` is accepted
            with a ``FutureWarning``).
        eps, momentum, affine, track_running_stats: as in BatchNorm (``momentum=None``: a
            cumulative average). The affine is shared by the components.
        update: how the mixture is learned ([CBN] Alg. 2). ``"momentum"`` (default; online
            EM): the mixture *is* the running estimates (``running_prior``, ``running_mean``,
            ``running_var``), which follow each training batch's share of posterior mass
            ``mean_i tau_k(x_i)``, weighted means and (unbiased) weighted variances at rate
            ``momentum`` (PyTorch's convention: the weight of the new value). ``"gradient"``:
            ``lambda, m_k, Sigma_k`` are parameters trained by backpropagation (reached through
            the posterior only), and the same running estimates are kept beside them.
        inference: what eval mode normalises with, in gradient mode. ``"running"`` (default):
            the running estimates of ``mu_k, v_k``, i.e. what training normalised with, as in
            BatchNorm; the posterior and the gain still come from the learned mixture, as in
            training. ``"mixture"``: the learned ``m_k, Sigma_k`` themselves ([CBN] Eq. 15, the
            papers' inference), which gradient training never pulls towards the batch
            statistics, so eval output departs from training output (measured: the demo's
            test accuracy falls to chance). In momentum mode the two coincide. With
            ``track_running_stats=False``, ``"running"`` uses the eval batch's own statistics.
        variance_floor: each ``v_k`` is kept at or above this fraction of the batch's
            variance in its channel. A component that concentrates on a few positions gets a
            near-zero variance in some channel and amplifies, by ``1/sqrt(v_k + eps)``, every
            position it keeps some weight on; in DenseNet-40 with every norm replaced, some
            component's variance reached 1e-8 of its channel's without the floor.
        prior_scaling: the ``g_k = 1/sqrt(lambda_k)`` gain of [CBN] Eq. 7. Off by default:
            measured in DenseNet-40 with every norm replaced (4 epochs, lr 0.1), it amplifies
            the positions of rarely used components (x10 at ``lambda_k = 0.01``), the network
            starves those components (1.6 of 4 in use per layer against 3.7 without it), and
            the training loss ends at 2.13 against 1.80 without it (BatchNorm 1.73); in the
            shallow demo network it changes nothing measurable.
        channel_last: the input is (N, *, C), e.g. tokens (N, L, C).
        device, dtype: where and in which dtype parameters and buffers are created.

    The component means start at random (torch's generator) around zero, one unit apart,
    since identical components would get identical posteriors and updates and never separate.
    A component with fewer than two effective positions in a batch keeps its running
    estimates for that batch.

    Diagnostics (buffers, updated in training): ``running_prior``, the share of the posterior
    mass each component received; ``running_entropy``, the mean posterior entropy per
    position; see :mod:`contextnorm.layers.diagnostics`.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        update: str = "momentum",
        inference: str = "running",
        variance_floor: float = 1e-2,
        prior_scaling: bool = False,
        channel_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_components: int | None = None,
    ) -> None:
        count = renamed_count("num_contexts", num_contexts, "num_components", num_components)
        super().__init__(
            num_features, count, eps, momentum, affine, variance_floor, prior_scaling, channel_last
        )
        if update not in _UPDATE_MODES:
            raise ValueError(f"update must be one of {_UPDATE_MODES}, got {update!r}")
        if inference not in _INFERENCE_MODES:
            raise ValueError(f"inference must be one of {_INFERENCE_MODES}, got {inference!r}")
        if update == "momentum" and not track_running_stats:
            raise ValueError(
                "update='momentum' keeps the mixture in the running estimates, so it needs "
                "track_running_stats=True; use update='gradient' to learn it without them"
            )
        self.update = update
        self.inference = inference
        self._init_running(track_running_stats)
        if update == "gradient":
            self.prior_logits = nn.Parameter(torch.zeros(count))
            self.component_mean = nn.Parameter(torch.zeros(count, num_features))
            self.component_raw_std = nn.Parameter(torch.zeros(count, num_features))
        self.reset_parameters()
        self.to(device=device, dtype=dtype)

    def reset_running_stats(self) -> None:
        """Running estimates back to their start (momentum mode: the mixture, new random means)."""
        super().reset_running_stats()
        if self.update == "momentum":
            with torch.no_grad():
                self.running_mean.normal_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.update == "gradient":
            with torch.no_grad():
                self.prior_logits.zero_()
                self.component_mean.normal_()
                self.component_raw_std.fill_(_SOFTPLUS_OF_ONE)
        self._reset_affine()

    def _load_batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        """Start from BatchNorm's statistics: components around its mean, one std apart."""
        spread = var.clamp_min(self.eps).sqrt()
        means = mean + spread * torch.randn(
            self.num_contexts, self.num_features, device=mean.device, dtype=mean.dtype
        )
        if self.update == "gradient":
            self.component_mean.copy_(means)
            self.component_raw_std.copy_(inverse_softplus(spread).expand_as(self.component_raw_std))
        else:
            self.running_mean.copy_(means)
            self.running_var.copy_(var.expand_as(self.running_var))

    @property
    def prior(self) -> Tensor:
        """The mixture weights ``lambda`` (K,) of the posterior (learned ones in gradient mode)."""
        return (
            torch.softmax(self.prior_logits, 0) if self.update == "gradient" else self.running_prior
        )

    @property
    def mixture_mean(self) -> Tensor:
        """The means ``m_k`` (K, C) of the posterior's mixture."""
        return self.component_mean if self.update == "gradient" else self.running_mean

    @property
    def mixture_var(self) -> Tensor:
        """The variances ``diag(Sigma_k)`` (K, C) of the posterior's mixture."""
        return (
            nnf.softplus(self.component_raw_std).square()
            if self.update == "gradient"
            else self.running_var
        )

    def _mixture(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(log lambda (K,), m (K, C), Sigma + eps (K, C))`` of the posterior, in ``dtype``."""
        if self.update == "gradient":
            log_prior = torch.log_softmax(self.prior_logits.to(dtype), 0)
            mean = self.component_mean.to(dtype)
            var = nnf.softplus(self.component_raw_std.to(dtype)).square()
        else:
            prior, mean, var = (
                _snapshot(t.to(dtype))
                for t in (self.running_prior, self.running_mean, self.running_var)
            )
            log_prior = prior.clamp_min(_TINY_PRIOR).log()
        return log_prior, mean, var + self.eps

    def _normalize(self, view: Tensor) -> Tensor:
        log_prior, mean, var = self._mixture(view.dtype)
        eval_statistics = self._eval_statistics(view.dtype)
        if eval_statistics is not None:
            return self._running_transform(view, log_prior, mean, var, *eval_statistics)
        # The batch mean per channel; zeros for an empty batch (a synchronised layer's, whose
        # statistics come from the other processes).
        reference = view.detach().sum((0, 2)) / max(view.shape[0] * view.shape[2], 1)
        coefficients = F.log_joint_coefficients(log_prior, mean, var, reference)
        return self._batch_transform(
            view, coefficients, reference, self._gain(log_prior), posterior_grad=True
        )

    def _eval_statistics(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The (K, C) means and variances eval mode normalises with; ``None``: batch statistics."""
        if self.training:
            return None
        if self.update == "momentum" or self.inference == "running":
            if not self.track_running_stats:
                return None
            return self.running_mean.to(dtype), self.running_var.to(dtype)
        return self.component_mean.to(dtype), nnf.softplus(
            self.component_raw_std.to(dtype)
        ).square()

    def _extra_repr_parts(self) -> list[str]:
        parts = [f"update={self.update!r}"]
        if self.update == "gradient":
            parts.append(f"inference={self.inference!r}")
        return parts


class MixtureNorm(_PositionMixture):
    r"""Mixture Normalization (MixNorm of [MN]), the baseline the papers compare against.

    Every training batch, a K-component diagonal GMM is fitted to the positions' channel
    vectors by ``em_steps`` EM iterations ([PKN] Eq. 17-18) on at most ``max_positions``
    positions drawn at random; all positions are then normalised with the posterior-weighted
    batch statistics under that fit ([PKN] Eq. 19-21, [CBN] Eq. 7-9):
    ``y_i = weight * sum_k tau_k(x_i) g_k (x_i - mu_k) / sqrt(v_k + eps) + bias``, with
    ``g_k = 1/sqrt(lambda_k)`` (``lambda_k`` the batch's share of posterior mass) when
    ``prior_scaling`` is on. The posterior is treated as a constant: gradients flow through
    the weighted statistics, not through EM. Eval normalises with running estimates of those
    statistics and weights, under the posterior of the running mixture; the first training
    batch's values replace the running estimates (the next batch's EM starts from them), later
    ones are averaged in at rate ``momentum``.

    Args:
        num_features, num_contexts, eps, momentum, affine, track_running_stats, channel_last,
            device, dtype: as in :class:`AdaptiveContextNorm` (without running estimates, eval
            fits a mixture to the eval batch as training does).
        em_steps, max_positions: EM iterations per batch, and the positions they run on.
        seeding: where each batch's EM starts. ``"running"`` (default): from the running
            mixture (k-means++ on the first batch only), so that components keep their
            identity from batch to batch and the training posterior is a few EM steps away
            from the one eval uses. ``"kmeans++"``: fresh k-means++ seeds every batch (as in
            [MN]), the fitted components paired with the running ones by their means.
            Measured on a stationary 3-component stream, 3 EM steps from fresh seeds often
            end in another local optimum (two components on one cluster, one across two),
            and those fits leak into the running estimates: the train/eval gap was 1.1-7.4x
            BatchNorm's over 5 seeds, against 0.9-1.5x when starting from the running mixture.
        variance_floor: the fitted variances and the ``v_k`` that normalise are kept at or
            above this fraction of the batch's variance in their channel. A component that
            collapses onto a few positions otherwise gets a near-zero variance in some
            channel and amplifies every position it keeps some weight on by
            ``1/sqrt(v_k + eps)``; stacked in DenseNet-40 at lr 0.1 this overflowed.
        prior_scaling: the ``1/sqrt(lambda_k)`` gain of [MN] and [PKN] Eq. 19. Off by default:
            in DenseNet-40 with every norm replaced it made the first epoch's training loss
            5.31 against 2.25 without it (BatchNorm 2.19); see :class:`AdaptiveContextNorm`.

    Non-finite activations raise a ``FloatingPointError`` saying the network has diverged.
    Training reads two values on the host per batch (that check, and whether a running
    mixture exists yet); eval reads none.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        em_steps: int = 3,
        max_positions: int = 2048,
        seeding: str = "running",
        variance_floor: float = 1e-2,
        prior_scaling: bool = False,
        channel_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_components: int | None = None,
    ) -> None:
        count = renamed_count("num_contexts", num_contexts, "num_components", num_components)
        super().__init__(
            num_features, count, eps, momentum, affine, variance_floor, prior_scaling, channel_last
        )
        self.em_steps = check_count("em_steps", em_steps)
        self.max_positions = check_count("max_positions", max_positions)
        if seeding not in ("running", "kmeans++"):
            raise ValueError(f"seeding must be 'running' or 'kmeans++', got {seeding!r}")
        self.seeding = seeding
        self._init_running(track_running_stats)
        self.to(device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()

    def _normalize(self, view: Tensor) -> Tensor:
        dtype = view.dtype
        if not self.training and self.track_running_stats:
            log_prior = self.running_prior.to(dtype).clamp_min(_TINY_PRIOR).log()
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
            return self._running_transform(view, log_prior, mean, var + self.eps, mean, var)
        reference = view.detach().mean((0, 2))
        log_prior, mean, var = self._fit_batch(view.detach(), reference)
        # The fit is centred on the reference already.
        zero = torch.zeros_like(reference)
        coefficients = F.log_joint_coefficients(log_prior, mean, var + self.eps, zero)
        # None: the batch's own mixture weights give the 1/sqrt(lambda) gain.
        gain = None if self.prior_scaling else torch.ones_like(log_prior)
        # The running mixture is where the next batch's EM starts: the first fit replaces it.
        return self._batch_transform(
            view, coefficients, reference, gain, posterior_grad=False, restart=True
        )

    def _fit_batch(self, view: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log lambda (K,), mean - reference (K, C), var (K, C))`` of a GMM fitted to the batch.

        EM runs on at most ``max_positions`` positions drawn at random, centred on
        ``reference`` (the batch mean) so that the fit keeps its precision far from zero, with
        the variances floored as the normalising ones are.
        """
        points = F.sample_positions(view, self.max_positions) - reference
        if not bool(torch.isfinite(points).all()):
            raise FloatingPointError(
                "MixtureNorm received non-finite activations, so no mixture can be fitted: the "
                "network has diverged upstream (lower the learning rate, or check the input)"
            )
        floor = self.variance_floor * points.var(0, correction=0)
        log_prior, mean, var = F.fit_diag_gmm(
            points, *self._start(points, reference, floor), self.em_steps, floor
        )
        if self.seeding == "kmeans++" and self.track_running_stats:
            running_mean = self.running_mean.to(mean) - reference
            order = F.match_components(mean, running_mean, self.running_var.to(mean) + self.eps)
            log_prior, mean, var = log_prior[order], mean[order], var[order]
        return log_prior, mean, var

    def _start(
        self, points: Tensor, reference: Tensor, floor: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Where EM starts: the running mixture, or k-means++ seeds with the batch's variance.

        ``points`` are centred on ``reference``, and so is the start. Reading the batch
        counter is a host synchronisation, one more beside the finiteness check of training.
        """
        k = self.num_contexts
        if (
            self.seeding == "running"
            and self.track_running_stats
            and int(self.num_batches_tracked) > 0
        ):
            return (
                self.running_prior.to(points.dtype).clamp_min(_TINY_PRIOR).log(),
                self.running_mean.to(points.dtype) - reference,
                torch.maximum(self.running_var.to(points.dtype), floor),
            )
        uniform = torch.full((k,), -math.log(k), dtype=points.dtype, device=points.device)
        spread = torch.maximum(points.var(0, correction=0), floor).expand(k, -1)
        return uniform, F.kmeans_plus_plus(points, k), spread

    def _extra_repr_parts(self) -> list[str]:
        return [
            f"em_steps={self.em_steps}",
            f"max_positions={self.max_positions}",
            f"seeding={self.seeding!r}",
        ]
