"""Supervised context layers: CN, CN-X and CN-E (METHODS.md; papers 000, 002, 004).

All three normalise sample ``n`` of context ``k`` as
``y = gamma_k * (x - mu_k) / sqrt(var_k + eps) / sqrt(lambda_k) + beta_k`` and differ in
where ``mu_k, var_k`` come from: the mini-batch (CN), learned parameters (CN-X), or a
learned map from the context's encoding (CN-E). The per-context statistics feed one
(K, C) table of affine coefficients; each sample picks its row (or mixes rows), so the
cost does not grow with the number of contexts.

Precision and speed: statistics, posteriors and coefficients are computed in float32
(float64 for float64 input) with autocast disabled; the output has the input's dtype, as
BatchNorm's. The forward and backward read no tensor on the host (contexts are checked
where they enter, see :mod:`contextnorm.layers.assignment`), so the layers compile into
one graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .. import functional as F
from .assignment import ContextAssignment
from .base import (
    _SOFTPLUS_OF_ONE,
    NormBase,
    RunningStatsMixin,
    check_agreement,
    check_count,
    check_momentum,
    inverse_softplus,
)
from .routing import MISSING, current_context

__all__ = ["ContextNorm", "ContextNormX", "ContextNormE"]

# Floor for an estimated prior: a context never seen in training must not get an infinite gain.
_MIN_PRIOR = 1e-6


class _ContextNormBase(NormBase):
    """The shared forward of the supervised context layers; subclasses supply the statistics."""

    uses_context = True

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float,
        affine: bool,
        prior: Sequence[float] | Tensor | None,
        estimate_prior: bool,
        prior_scaling: bool,
        channel_last: bool,
        validate_context: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_last, device, dtype)
        self.num_contexts = check_count("num_contexts", num_contexts)
        self.estimate_prior = bool(estimate_prior)
        self.prior_scaling = bool(prior_scaling)
        self.validate_context = bool(validate_context)
        given = self._initial_prior(prior)
        self.register_buffer("prior", given.to(**self._factory))
        self._given_prior = given
        if self.estimate_prior:
            self.register_buffer("prior_batches", torch.tensor(0, dtype=torch.long, device=device))

    def _initial_prior(self, prior: Sequence[float] | Tensor | None) -> Tensor:
        if prior is None:
            return torch.full((self.num_contexts,), 1.0 / self.num_contexts)
        prior = torch.as_tensor(prior, dtype=torch.float32).flatten()
        if prior.shape != (self.num_contexts,):
            raise ValueError(
                f"prior must hold one probability per context: shape ({self.num_contexts},), got "
                f"{tuple(prior.shape)}"
            )
        if not bool(torch.isfinite(prior).all()) or bool((prior <= 0).any()):
            raise ValueError("prior must be finite and positive for every context (lambda_k > 0)")
        return prior / prior.sum()

    def reset_prior(self) -> None:
        """Back to the prior given at construction (uniform when none was given)."""
        with torch.no_grad():
            self.prior.copy_(self._given_prior.to(self.prior))
            if self.estimate_prior:
                self.prior_batches.zero_()

    def _update_prior(self, assignment: ContextAssignment, count: Tensor | None) -> None:
        """Cumulative average of the batches' context shares: the share of the data in each context.

        ``count`` (K,): the values per context behind this call's batch statistics (over every
        process when synchronised), or ``None`` when the call computed none; the shares are
        then counted here (and all-reduced when synchronised).
        """
        with torch.no_grad():
            if count is None:
                count = assignment.weights.sum(0)
                group = self._statistics_group()
                if group is not None:
                    check_agreement(self, group, self.num_contexts, count.device)
                    count = F.all_reduce_sum(count, group)
            counts = count.to(self.prior)
            total = counts.sum()
            seen = total > 0
            self.prior_batches.add_(seen.long())
            rate = seen.to(self.prior) / self.prior_batches.clamp_min(1).to(self.prior)
            self.prior.add_((counts / total.clamp_min(1e-12) - self.prior) * rate)

    def _gain(self) -> Tensor | None:
        """``1/sqrt(lambda_k)`` as a (K, 1) column, or ``None`` when prior scaling is off."""
        if not self.prior_scaling:
            return None
        return self.prior.clamp_min(_MIN_PRIOR).rsqrt().unsqueeze(1)

    def _log_prior(self) -> Tensor:
        return self.prior.clamp_min(_MIN_PRIOR).log()

    def forward(self, x: Tensor, context: Tensor | None = MISSING) -> Tensor:
        """Normalise ``x`` with its contexts.

        ``context``: int64 ids (N,) in [0, K), -1 where unknown; soft assignments (N, K); or
        ``None`` (all unknown). When not passed, the context in scope of
        :func:`contextnorm.use_context` is used. A context passed here is checked here when
        ``validate_context`` is set (the default); one in scope was checked when the scope
        opened.
        """
        context, validate = current_context(context, self)
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        with F.without_autocast(x):
            dtype = torch.promote_types(F.statistics_dtype(x.dtype), self.prior.dtype)
            assignment = ContextAssignment.from_context(
                context, x3.shape[0], self.num_contexts, x3.device, dtype, validate
            )
            return restore(F.cast(self._normalize(x3, assignment), x.dtype))

    def _normalize(self, x: Tensor, assignment: ContextAssignment) -> Tensor:
        """The output (N, C, L) for the batch ``x`` (N, C, L), in the statistics' dtype or
        ``x``'s."""
        moments = F.sample_moments(x) if self._needs_moments(assignment) else None
        mean, var, count = self._context_statistics(x, assignment, moments)
        if self.training and self.estimate_prior:
            self._update_prior(assignment, count)
        values = x if moments is None else moments.values
        ids = assignment.known_ids
        if ids is not None:
            return F.context_affine(
                values, ids, mean, var, self.eps, self._gain(), self.weight, self.bias
            )
        scale, shift = self._coefficients(mean, var, assignment, moments, x.shape[2])
        return F.apply_sample_affine(values, scale, shift)

    def _needs_moments(self, assignment: ContextAssignment) -> bool:
        return assignment.unknown is not None

    def _context_statistics(
        self, x: Tensor, assignment: ContextAssignment, moments: F.Moments | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-context mean and variance (K, C) for the batch ``x`` (N, C, L), and the count (K,)
        of values behind them when they are batch statistics (``None`` otherwise)."""
        raise NotImplementedError

    def _batch_statistics(
        self, assignment: ContextAssignment, moments: F.Moments, positions: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, biased variance (K, C) and count (K,) of each context's activations in the
        batch."""
        ids = assignment.known_ids
        return self._pooled_moments(
            moments.mean,
            moments.var,
            positions,
            weights=None if ids is not None else assignment.weights,
            ids=ids,
            num_groups=self.num_contexts,
        )

    def _coefficients(
        self,
        mean: Tensor,
        var: Tensor,
        assignment: ContextAssignment,
        moments: F.Moments | None,
        positions: int,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample ``(scale, shift)`` (N, C) for soft or partly unknown contexts: a mix of the
        table's rows."""
        table_scale, table_shift = F.affine_coefficients(
            mean, var, self.eps, self._gain(), self.weight, self.bias
        )
        weights = assignment.weights
        if assignment.unknown is not None:
            assert moments is not None
            weights = assignment.with_posterior(self.posterior(moments, positions, mean, var))
        return weights @ table_scale, weights @ table_shift

    def posterior(self, moments: F.Moments, positions: int, mean: Tensor, var: Tensor) -> Tensor:
        """``p(k | x_n)`` (N, K) of each whole sample under the per-context Gaussians (``mean``,
        ``var``).

        A sample belongs to one context, as in training, so the evidence of all its
        activations is pooled; computed in log space (000 Eq. 6; 004 Eq. 13 without its
        extra division by K, which would stop the posterior from summing to 1).
        """
        return F.sample_log_posterior(
            moments.mean, moments.var, positions, mean, var + self.eps, self._log_prior()
        ).exp()

    def extra_repr(self) -> str:
        parts = [f"{self.num_features}", f"num_contexts={self.num_contexts}", f"eps={self.eps}"]
        parts += self._extra_repr_parts()
        parts += [f"affine={self.affine}", f"prior_scaling={self.prior_scaling}"]
        if self.estimate_prior:
            parts.append("estimate_prior=True")
        if self.channel_last:
            parts.append("channel_last=True")
        if not self.validate_context:
            parts.append("validate_context=False")
        return ", ".join(parts)

    def _extra_repr_parts(self) -> list[str]:
        return []


class ContextNorm(RunningStatsMixin, _ContextNormBase):
    r"""Context Normalization (CN): batch statistics per context (002, Alg. 1-2).

    In training, each context present in the batch is normalised with the mean and biased
    variance of its own activations; running estimates per context (BatchNorm's momentum
    rule) serve inference. A context absent from a batch keeps its running statistics
    untouched. With ``num_contexts=1`` and ``prior_scaling=False`` (or K=1, whose prior is
    1) it is exactly :class:`torch.nn.BatchNorm2d`: outputs, gradients, running statistics,
    an empty batch (N = 0: an empty output, running statistics untouched).

    Args:
        num_features: channels ``C``.
        num_contexts: contexts ``K``; ids lie in [0, K).
        eps, momentum, affine, track_running_stats: as in BatchNorm (``momentum=None`` is a
            cumulative average, counted per context).
        prior: ``lambda_k`` (K,), normalised to sum to 1; uniform when omitted.
        estimate_prior: estimate ``lambda_k`` from the contexts seen in training (a
            cumulative average of the batches' shares), starting from ``prior``.
        prior_scaling: multiply by ``1/sqrt(lambda_k)`` (002 Alg. 3; 004 Eq. 10 and the
            authors' CN-X code leave it out). Off by default: it multiplies each layer's output
            by sqrt(K) for uniform priors, which compounds with depth; measured on the reduced
            DenseNet-40 and Shallow CNN (3 seeds, ``results/prior_scaling_*``), it lowered
            DenseNet-40's test accuracy with CN and changed nothing on the Shallow CNN.
        channel_last: the input is (N, *, C), e.g. tokens (N, L, C).
        validate_context: check a context passed to ``forward`` (one host read per call).
            ``False`` for compiled graphs: ids out of range then go undetected, and ids of
            -1 are handled with ``torch.where`` (the posterior is computed for every batch).
            Contexts from :func:`~contextnorm.use_context` are checked there instead.
        device, dtype: where the parameters and buffers live, as in PyTorch's layers.

    Shape: input (N, C), (N, C, *) or (N, *, C) with ``channel_last``; output the same.

    A context with a single value per channel in a training batch (one sample, no spatial
    extent) has no variance: the layer raises when the context was checked, as BatchNorm
    does for a batch of one; unchecked, that sample's output is ``beta_k`` (zero variance,
    ``eps`` keeps it finite). Samples with an unknown context (-1 or ``None``) are normalised
    in eval by the posterior mixture over the running statistics; in training a checked
    context must be known for every sample (use CN-X or CN-E to train with unknown
    contexts), while unchecked ones mix the batch statistics by the posterior.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        prior: Sequence[float] | Tensor | None = None,
        estimate_prior: bool = False,
        prior_scaling: bool = False,
        channel_last: bool = False,
        validate_context: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            num_contexts,
            eps,
            affine,
            prior,
            estimate_prior,
            prior_scaling,
            channel_last,
            validate_context,
            device,
            dtype,
        )
        self.momentum = check_momentum(momentum, allow_none=True)
        self._init_affine((num_contexts, num_features))
        self._init_running_stats(
            num_contexts, num_features, track_running_stats, count_per_group=True
        )

    def reset_parameters(self) -> None:
        """Running statistics, affine parameters and an estimated prior back to their start."""
        self.reset_running_stats()
        self._reset_affine()
        if self.estimate_prior:
            self.reset_prior()

    def _uses_batch_statistics(self) -> bool:
        return self.training or not self.track_running_stats

    def _needs_moments(self, assignment: ContextAssignment) -> bool:
        return self._uses_batch_statistics() or assignment.unknown is not None

    def _normalize(self, x: Tensor, assignment: ContextAssignment) -> Tensor:
        ids = assignment.known_ids
        if (
            ids is None
            or not self._uses_batch_statistics()
            or self._statistics_group() is not None
            or self._statistics_record is not None
        ):
            return super()._normalize(x, assignment)
        # Known ids, this process's batch: one fused autograd node (F.context_batch_norm)
        # instead of the composition of moments, pooling and affine map. Checks come first, so
        # that a refused batch changes no state; the prior is updated before the gain is read,
        # as in the composed path.
        if self.training and assignment.checked and x.shape[2] == 1:
            self._check_singletons(assignment, None)
        if self.training and self.estimate_prior:
            self._update_prior(assignment, None)
        update = self.training and self.track_running_stats
        y, _, _, _ = F.context_batch_norm(
            x,
            ids,
            self.num_contexts,
            self.eps,
            self._gain(),
            self.weight,
            self.bias,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.num_batches_tracked if update else None,
            self.momentum,
        )
        return y

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        if self.training and self.track_running_stats:
            momentum = self._running_momentum(count > 0)
            F.update_running_moments(
                self.running_mean, self.running_var, mean, var, count, momentum
            )

    def _context_statistics(
        self, x: Tensor, assignment: ContextAssignment, moments: F.Moments | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if not self._uses_batch_statistics():
            return self.running_mean, self.running_var, None
        assert moments is not None
        positions = x.shape[2]
        checked = self.training and assignment.checked
        if checked and assignment.unknown is not None:
            raise ValueError(
                "ContextNorm computes batch statistics per context and needs a known context for "
                "every "
                "sample while training (got ids of -1 or context=None); unknown contexts are "
                "handled in "
                "eval mode, or train with ContextNormX / ContextNormE"
            )
        mean, var, count = self._batch_statistics(assignment, moments, positions)
        if checked and positions == 1:
            self._check_singletons(assignment, count)
        self._update_running_stats(mean, var, count)
        return mean, var, count

    def _check_singletons(self, assignment: ContextAssignment, count: Tensor | None) -> None:
        """Refuse contexts with one value per channel: their variance is undefined.

        The checked context lists them for this process's batch; synchronised, the batch is
        every process's, so the reduced counts decide (one host read of K values, the same on
        every process, so that all raise together; ``count`` is only read then).
        """
        if self._statistics_group() is None:
            singletons = list(assignment.singletons)
        else:
            singletons = torch.nonzero(count == 1).flatten().tolist()
        if singletons:
            raise ValueError(
                f"context(s) {singletons} have a single value per channel in this training "
                "batch, so their variance is undefined (BatchNorm raises for a batch of one "
                "likewise); use "
                "larger batches, sample batches so that each present context has >= 2 samples, or "
                "use "
                "ContextNormX"
            )

    def _extra_repr_parts(self) -> list[str]:
        return [f"momentum={self.momentum}", f"track_running_stats={self.track_running_stats}"]


class _LearnedStatisticsBase(_ContextNormBase):
    """CN-X and CN-E: learned statistics, started from each context's first training batch.

    ``initialized`` (K,) marks the contexts whose statistics were set from data (or from a
    converted BatchNorm). Until every context is marked, training batches compute their
    per-context statistics (without gradient) and copy them into the new contexts'
    parameters with ``torch.where``; eager mode then reads one flag on the host to stop doing
    so once every context is marked, a compiled graph keeps the (cheap, fused) update.
    """

    def __init__(self, *args: object, data_init: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.data_init = bool(data_init)
        self.register_buffer(
            "initialized",
            torch.zeros(self.num_contexts, dtype=torch.bool, device=self._factory["device"]),
        )
        self._init_pending = self.data_init
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh_init_pending())

    def _refresh_init_pending(self) -> None:
        self._init_pending = self.data_init and not bool(self.initialized.all())

    def _initializing(self) -> bool:
        return self.training and self._init_pending

    def _start_from_data(
        self, x: Tensor, assignment: ContextAssignment, moments: F.Moments | None
    ) -> Tensor | None:
        """The data-dependent start, while it is pending: set the new contexts' statistics from
        this batch. Returns the batch's count per context (K,) when it ran, else ``None``."""
        if not self._initializing():
            return None
        # Outside autograd, so that the graph (and what activation checkpointing saves and
        # recomputes) is the same before and after the start. Synchronised, the start comes
        # from every process's batch, so that all processes start from the same parameters.
        with torch.no_grad():
            batch = F.sample_moments(x) if moments is None else moments
            mean, var, count = self._batch_statistics(assignment, batch, x.shape[2])
            self._initialize(mean, var.clamp_min(self.eps).sqrt(), count)
        if not torch.compiler.is_compiling():
            self._refresh_init_pending()
        return count

    def _context_statistics(
        self, x: Tensor, assignment: ContextAssignment, moments: F.Moments | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        count = self._start_from_data(x, assignment, moments)
        # After a start, a later forward before this one's backward may start another context,
        # writing its row in place (AdaMatch runs the source alone, then source and target):
        # this forward's graph must not hold the parameters themselves.
        return (*self._learned_statistics(copy=count is not None), count)

    def _normalize(self, x: Tensor, assignment: ContextAssignment) -> Tensor:
        ids = assignment.known_ids
        if ids is None:
            return super()._normalize(x, assignment)
        # Known ids: the statistics and the affine map in one step, which on the CPU is one
        # native autograd node (F.learned_context_affine) instead of the statistics' several.
        count = self._start_from_data(x, assignment, None)
        if self.training and self.estimate_prior:
            self._update_prior(assignment, count)
        mean, raw_std, mean_offset, raw_std_offset = self._statistic_parts(count is not None)
        return F.learned_context_affine(
            x,
            ids,
            mean,
            raw_std,
            self.eps,
            self._gain(),
            self.weight,
            self.bias,
            mean_offset,
            raw_std_offset,
        )

    def _statistic_parts(
        self, copy: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(mean, raw_std, mean_offset, raw_std_offset)`` as
        :func:`~contextnorm.functional.learned_context_affine` takes them; ``copy``: from
        copies of the parameters."""
        raise NotImplementedError

    def _learned_statistics(self, copy: bool = False) -> tuple[Tensor, Tensor]:
        """Mean and variance (K, C); ``copy``: computed from copies of the parameters."""
        return F.learned_statistics(*self._statistic_parts(copy))

    def _initialize(self, mean: Tensor, std: Tensor, count: Tensor) -> None:
        """Set the statistics of the contexts seen for the first time (count > 0) to ``mean``,
        ``std``."""
        raise NotImplementedError

    def _load_batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        count = torch.ones(self.num_contexts, device=mean.device)
        self.initialized.zero_()
        std = var.clamp_min(self.eps).sqrt()
        self._initialize(
            mean.expand(self.num_contexts, -1), std.expand(self.num_contexts, -1), count
        )
        self._refresh_init_pending()

    def reset_parameters(self) -> None:
        """Learned statistics, affine parameters and prior back to their start; data init
        re-armed."""
        self._reset_statistics()
        self._reset_affine()
        self.reset_prior()
        self.initialized.zero_()
        self._init_pending = self.data_init

    def _reset_statistics(self) -> None:
        raise NotImplementedError

    def reset_running_stats(self) -> None:
        """CN-X and CN-E keep no running statistics: nothing to reset (as
        ``track_running_stats=False``)."""


class ContextNormX(_LearnedStatisticsBase):
    r"""CN-X: per-context statistics learned by backpropagation (002 §III-C; ACN in 000; SCB-Norm
    in 004).

    ``mu_k`` and ``sigma_k`` (K, C) are parameters, ``sigma_k = softplus(raw_std_k)``;
    there are no batch statistics, so training and inference compute the same function and
    small contexts in a batch are harmless. Soft assignments (N, K) mix the contexts'
    transforms; unknown contexts use the posterior under the learned Gaussians, in training too.

    ``data_init`` (default ``True``): each context's ``mu, sigma`` start from the mean and
    standard deviation of its activations in the first training batch that holds it, as
    Glow's ActNorm starts, so that the layer normalises from the first step; without it they
    start at 0 and 1, which does not normalise at all. :func:`~contextnorm.convert` starts
    them from the BatchNorm's running statistics instead.

    Learned statistics do not follow the activations as the weights move, so a deep net of
    these layers meets large learning rates as a net without norms does: DenseNet-40 with every
    norm CN-X (or CN-E) can diverge within 10 steps of SGD at lr 0.1. The statistics are not
    the cause (measured): the same net with them frozen at their data start diverges at the
    same step, as it does with weight decay kept off them; the conv weights' gradient norm
    grows several-fold a step from the first one while CN-X's statistics change by about 1 %.
    A batch-statistics norm absorbs that growth; here, clipping the gradient norm (the runner's
    ``train.gradient_clip``; 5 there is above BatchNorm's steps) or a learning rate of 0.05 or
    less trains the net.
    Other arguments as :class:`ContextNorm` (no momentum).
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float = 1e-5,
        affine: bool = True,
        prior: Sequence[float] | Tensor | None = None,
        estimate_prior: bool = False,
        prior_scaling: bool = False,
        data_init: bool = True,
        channel_last: bool = False,
        validate_context: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            num_contexts,
            eps,
            affine,
            prior,
            estimate_prior,
            prior_scaling,
            channel_last,
            validate_context,
            device,
            dtype,
            data_init=data_init,
        )
        self.mean = nn.Parameter(torch.zeros(num_contexts, num_features, **self._factory))
        self.raw_std = nn.Parameter(
            torch.full((num_contexts, num_features), _SOFTPLUS_OF_ONE, **self._factory)
        )
        self._init_affine((num_contexts, num_features))

    @property
    def std(self) -> Tensor:
        return nnf.softplus(self.raw_std)

    def _reset_statistics(self) -> None:
        nn.init.zeros_(self.mean)
        nn.init.constant_(self.raw_std, _SOFTPLUS_OF_ONE)

    def _initialize(self, mean: Tensor, std: Tensor, count: Tensor) -> None:
        with torch.no_grad():
            new = ((count > 0) & ~self.initialized).unsqueeze(1)
            self.mean.copy_(torch.where(new, mean.to(self.mean), self.mean))
            self.raw_std.copy_(
                torch.where(new, inverse_softplus(std.to(self.raw_std)), self.raw_std)
            )
            self.initialized.logical_or_(new.squeeze(1))

    def _statistic_parts(
        self, copy: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        if copy:
            return self.mean.clone(), self.raw_std.clone(), None, None
        return self.mean, self.raw_std, None, None

    def _extra_repr_parts(self) -> list[str]:
        return [] if self.data_init else ["data_init=False"]


class ContextNormE(_LearnedStatisticsBase):
    r"""CN-E: statistics from a learned map of the context's encoding (000 §4 ACN-base; 004
    SCB-Norm-base).

    ``mu = f_mu(e)``, ``sigma = softplus(f_sigma(e))`` with ``e`` the one-hot encoding of
    the context id, or any soft assignment (N, K) given as ``context`` (encoded as it is,
    not as a mix of the contexts' transforms). ``f`` is one linear layer, or a small MLP
    with ``hidden_features``. The affine ``gamma, beta`` (C,) is shared. Unknown contexts
    use the posterior over the K encoded contexts.

    ``data_init`` (default ``True``): with one linear layer, each context's encoded
    ``mu, sigma`` start from its first training batch (the map's column for that context is
    set); with an MLP, whose output cannot be set per context, the output bias starts from the
    statistics of the first training batch as a whole. Without it the maps start at
    ``mu = 0, sigma = 1``. Like CN-X's, these statistics do not follow the activations: see
    :class:`ContextNormX` for what that means at large learning rates. Other arguments as
    :class:`ContextNormX`.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float = 1e-5,
        affine: bool = True,
        prior: Sequence[float] | Tensor | None = None,
        estimate_prior: bool = False,
        prior_scaling: bool = False,
        hidden_features: int | None = None,
        data_init: bool = True,
        channel_last: bool = False,
        validate_context: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            num_contexts,
            eps,
            affine,
            prior,
            estimate_prior,
            prior_scaling,
            channel_last,
            validate_context,
            device,
            dtype,
            data_init=data_init,
        )
        self.hidden_features = (
            None if hidden_features is None else check_count("hidden_features", hidden_features)
        )
        self.mean_encoder = self._encoder()
        self.std_encoder = self._encoder()
        self._init_affine((num_features,))
        self.reset_parameters()

    def _encoder(self) -> nn.Module:
        if self.hidden_features is None:
            return nn.Linear(self.num_contexts, self.num_features, **self._factory)
        return nn.Sequential(
            nn.Linear(self.num_contexts, self.hidden_features, **self._factory),
            nn.ReLU(),
            nn.Linear(self.hidden_features, self.num_features, **self._factory),
        )

    @staticmethod
    def _output_layer(encoder: nn.Module) -> nn.Linear:
        return encoder if isinstance(encoder, nn.Linear) else encoder[-1]

    def _reset_statistics(self) -> None:
        for encoder, start in ((self.mean_encoder, 0.0), (self.std_encoder, _SOFTPLUS_OF_ONE)):
            for module in encoder.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            output = self._output_layer(encoder)
            nn.init.zeros_(output.weight)
            nn.init.constant_(output.bias, start)

    def _initialize(self, mean: Tensor, std: Tensor, count: Tensor) -> None:
        with torch.no_grad():
            present = count > 0
            if self.hidden_features is None:
                new = present & ~self.initialized
                targets = ((self.mean_encoder, mean), (self.std_encoder, inverse_softplus(std)))
                for encoder, target in targets:
                    column = (target.to(encoder.bias) - encoder.bias).t()
                    encoder.weight.copy_(torch.where(new.unsqueeze(0), column, encoder.weight))
                self.initialized.logical_or_(new)
                return
            # An MLP's output cannot be set per context: start its bias from the whole batch.
            new = present.any() & ~self.initialized.any()
            share = (count / count.sum().clamp_min(1.0)).unsqueeze(1)
            overall_mean = (share * mean).sum(0)
            overall_var = (share * (std * std + (mean - overall_mean) ** 2)).sum(0)
            targets = (
                (self.mean_encoder, overall_mean),
                (self.std_encoder, inverse_softplus(overall_var.sqrt())),
            )
            for encoder, target in targets:
                bias = self._output_layer(encoder).bias
                bias.copy_(torch.where(new, target.to(bias), bias))
            self.initialized.logical_or_(new)

    def encode(self, encoding: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance (N, C) for encodings (N, K)."""
        std = nnf.softplus(self.std_encoder(encoding))
        return self.mean_encoder(encoding), std * std

    def _statistic_parts(
        self, copy: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        # Nothing here is saved for the backward but new tensors (the encoders' outputs) or
        # nothing at all (linear encoders: a transposed view and the bias, used by the
        # statistics' computation), with or without ``copy``, so the data-dependent start's
        # writes cannot reach a graph.
        if self.hidden_features is None:
            mean, std = self.mean_encoder, self.std_encoder
            return mean.weight.t(), std.weight.t(), mean.bias, std.bias
        return (
            self._context_table(self.mean_encoder),
            self._context_table(self.std_encoder),
            None,
            None,
        )

    @staticmethod
    def _context_table(encoder: nn.Sequential) -> Tensor:
        """The MLP encoder's output (K, C) for the K one-hot encodings.

        Its first linear layer applied to the identity is its weight, transposed, plus its
        bias: no (K, K) product, which would cost K^2 C at large K.
        """
        hidden = encoder[0].weight.t() + encoder[0].bias
        return encoder[1:](hidden)

    def _coefficients(
        self,
        mean: Tensor,
        var: Tensor,
        assignment: ContextAssignment,
        moments: F.Moments | None,
        positions: int,
    ) -> tuple[Tensor, Tensor]:
        if not assignment.soft:
            return super()._coefficients(mean, var, assignment, moments, positions)
        sample_mean, sample_var = self.encode(assignment.weights)
        gain = self._gain()
        sample_gain = None if gain is None else assignment.weights @ gain
        return F.affine_coefficients(
            sample_mean, sample_var, self.eps, sample_gain, self.weight, self.bias
        )

    def _extra_repr_parts(self) -> list[str]:
        parts = [] if self.hidden_features is None else [f"hidden_features={self.hidden_features}"]
        return parts + ([] if self.data_init else ["data_init=False"])
