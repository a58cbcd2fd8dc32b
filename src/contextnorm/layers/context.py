"""Supervised context layers: CN, CN-X and CN-E (METHODS.md; papers 000, 002, 004).

All three normalise sample ``n`` of context ``k`` as
``y = gamma_k * (x - mu_k) / sqrt(var_k + eps) / sqrt(lambda_k) + beta_k`` and differ in
where ``mu_k, var_k`` come from: the mini-batch (CN), learned parameters (CN-X), or a
learned map from the context's encoding (CN-E). The per-context statistics feed one
(K, C) table of affine coefficients; each sample picks its row (or mixes rows), so the
cost does not grow with the number of contexts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .. import functional as F
from .assignment import ContextAssignment
from .base import _SOFTPLUS_OF_ONE, NormBase, RunningStatsMixin, check_count, check_momentum, inverse_softplus
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
    ) -> None:
        super().__init__(num_features, eps, affine, channel_last)
        self.num_contexts = check_count("num_contexts", num_contexts)
        self.estimate_prior = bool(estimate_prior)
        self.prior_scaling = bool(prior_scaling)
        self.register_buffer("prior", self._initial_prior(prior))
        self._given_prior = self.prior.clone()
        if self.estimate_prior:
            self.register_buffer("prior_batches", torch.tensor(0, dtype=torch.long))

    def _initial_prior(self, prior: Sequence[float] | Tensor | None) -> Tensor:
        if prior is None:
            return torch.full((self.num_contexts,), 1.0 / self.num_contexts)
        prior = torch.as_tensor(prior, dtype=torch.float32).flatten()
        if prior.shape != (self.num_contexts,):
            raise ValueError(
                f"prior must hold one probability per context: shape ({self.num_contexts},), got {tuple(prior.shape)}"
            )
        if not bool(torch.isfinite(prior).all()) or bool((prior <= 0).any()):
            raise ValueError("prior must be finite and positive for every context (lambda_k > 0)")
        return prior / prior.sum()

    def reset_prior(self) -> None:
        """Back to the prior given at construction (uniform when none was given)."""
        self.prior.copy_(self._given_prior.to(self.prior))
        if self.estimate_prior:
            self.prior_batches.zero_()

    def _update_prior(self, assignment: ContextAssignment) -> None:
        """Cumulative average of the batches' context shares: the share of the data in each context."""
        with torch.no_grad():
            counts = assignment.weights.sum(0)
            total = counts.sum()
            if total <= 0:
                return
            self.prior_batches += 1
            share = (counts / total).to(self.prior)
            self.prior.add_((share - self.prior) / self.prior_batches.to(self.prior))

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
        :func:`contextnorm.use_context` is used.
        """
        context = current_context(context, self)
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        assignment = ContextAssignment.from_context(
            context, x3.shape[0], self.num_contexts, x3.device, self._stats_dtype()
        )
        if self.training and self.estimate_prior:
            self._update_prior(assignment)
        moments = F.sample_moments(x3) if self._needs_moments(assignment) else None
        mean, var = self._context_statistics(x3, assignment, moments)
        scale, shift = self._coefficients(mean, var, assignment, moments, x3.shape[2])
        return restore(F.apply_sample_affine(x3, scale, shift, moments))

    def _needs_moments(self, assignment: ContextAssignment) -> bool:
        return assignment.has_unknown

    def _context_statistics(
        self, x: Tensor, assignment: ContextAssignment, moments: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """Per-context mean and variance (K, C)."""
        raise NotImplementedError

    def _coefficients(
        self,
        mean: Tensor,
        var: Tensor,
        assignment: ContextAssignment,
        moments: tuple[Tensor, Tensor] | None,
        positions: int,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample ``(scale, shift)`` (N, C): each sample's row of the context table, or a mix of rows."""
        table_scale, table_shift = F.affine_coefficients(mean, var, self.eps, self._gain(), self.weight, self.bias)
        if not assignment.has_unknown:
            return assignment.rows(table_scale), assignment.rows(table_shift)
        weights = assignment.with_posterior(self.posterior(moments, positions, mean, var))
        return weights @ table_scale, weights @ table_shift

    def posterior(self, moments: tuple[Tensor, Tensor], positions: int, mean: Tensor, var: Tensor) -> Tensor:
        """``p(k | x_n)`` (N, K) of each whole sample under the per-context Gaussians.

        A sample belongs to one context, as in training, so the evidence of all its
        activations is pooled; computed in log space (000 Eq. 6; 004 Eq. 13 without its
        extra division by K, which would stop the posterior from summing to 1).
        """
        sample_mean, sample_var = moments
        return F.sample_log_posterior(
            sample_mean, sample_var, positions, mean, var + self.eps, self._log_prior()
        ).exp()

    def extra_repr(self) -> str:
        parts = [f"{self.num_features}", f"num_contexts={self.num_contexts}", f"eps={self.eps}"]
        parts += self._extra_repr_parts()
        parts += [f"affine={self.affine}", f"prior_scaling={self.prior_scaling}"]
        if self.estimate_prior:
            parts.append("estimate_prior=True")
        if self.channel_last:
            parts.append("channel_last=True")
        return ", ".join(parts)

    def _extra_repr_parts(self) -> list[str]:
        return []


class ContextNorm(RunningStatsMixin, _ContextNormBase):
    r"""Context Normalization (CN): batch statistics per context (002, Alg. 1-2).

    In training, each context present in the batch is normalised with the mean and biased
    variance of its own activations; running estimates per context (BatchNorm's momentum
    rule) serve inference. A context absent from a batch keeps its running statistics
    untouched. With ``num_contexts=1`` and ``prior_scaling=False`` (or K=1, whose prior is
    1) it is exactly :class:`torch.nn.BatchNorm2d`.

    Args:
        num_features: channels ``C``.
        num_contexts: contexts ``K``; ids lie in [0, K).
        eps, momentum, affine, track_running_stats: as in BatchNorm (``momentum=None`` is a
            cumulative average, counted per context).
        prior: ``lambda_k`` (K,), normalised to sum to 1; uniform when omitted.
        estimate_prior: estimate ``lambda_k`` from the contexts seen in training (a
            cumulative average of the batches' shares), starting from ``prior``.
        prior_scaling: multiply by ``1/sqrt(lambda_k)`` (the papers' default).
        channel_last: the input is (N, *, C), e.g. tokens (N, L, C).

    Shape: input (N, C), (N, C, *) or (N, *, C) with ``channel_last``; output the same.

    A context with a single value per channel in a training batch (one sample, no spatial
    extent) has no variance: the layer raises, as BatchNorm does for a batch of one.
    Samples with an unknown context (-1 or ``None``) are normalised in eval by the posterior
    mixture over the running statistics; in training CN needs every context (use CN-X or
    CN-E to train with unknown contexts).
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
        prior_scaling: bool = True,
        channel_last: bool = False,
    ) -> None:
        super().__init__(num_features, num_contexts, eps, affine, prior, estimate_prior, prior_scaling, channel_last)
        self.momentum = check_momentum(momentum, allow_none=True)
        self._init_affine((num_contexts, num_features))
        self._init_running_stats(num_contexts, num_features, track_running_stats, count_per_group=True)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()
        if self.estimate_prior:
            self.reset_prior()

    def _uses_batch_statistics(self) -> bool:
        return self.training or not self.track_running_stats

    def _needs_moments(self, assignment: ContextAssignment) -> bool:
        return self._uses_batch_statistics() or assignment.has_unknown

    def _context_statistics(
        self, x: Tensor, assignment: ContextAssignment, moments: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        if not self._uses_batch_statistics():
            return self.running_mean, self.running_var
        if assignment.has_unknown:
            raise ValueError(
                "ContextNorm computes batch statistics per context and needs a known context for every "
                "sample while training (got ids of -1 or context=None); unknown contexts are handled in "
                "eval mode, or train with ContextNormX / ContextNormE"
            )
        mean, var, mass = F.pooled_moments(*moments, assignment.weights, x.shape[2], assignment.ids)
        if self.training:
            self._check_enough_values(mass, assignment)
            if self.track_running_stats:
                self._update_running_stats(mean, var, mass)
        return mean, var

    @staticmethod
    def _check_enough_values(mass: Tensor, assignment: ContextAssignment) -> None:
        if assignment.soft:
            return
        single = torch.nonzero(mass == 1).flatten()
        if single.numel():
            raise ValueError(
                f"context(s) {single.tolist()} have a single value per channel in this training batch, so "
                "their variance is undefined (BatchNorm raises for a batch of one likewise); use larger "
                "batches, sample batches so that each present context has >= 2 samples, or use ContextNormX"
            )

    def _update_running_stats(self, mean: Tensor, var: Tensor, mass: Tensor) -> None:
        present = mass > 0
        self.num_batches_tracked.add_(present.long())
        if self.momentum is None:
            momentum = 1.0 / self.num_batches_tracked.clamp_min(1).to(self.running_mean)
        else:
            momentum = self.momentum
        F.update_running_moments(self.running_mean, self.running_var, mean, var, mass, momentum)

    def _extra_repr_parts(self) -> list[str]:
        return [f"momentum={self.momentum}", f"track_running_stats={self.track_running_stats}"]


class ContextNormX(_ContextNormBase):
    r"""CN-X: per-context statistics learned by backpropagation (002 §III-C; ACN in 000; SCB-Norm in 004).

    ``mu_k`` and ``sigma_k`` (K, C) are parameters, ``sigma_k = softplus(raw_std_k)``;
    there are no batch statistics, so training and inference compute the same function and
    small contexts in a batch are harmless. Arguments as :class:`ContextNorm` (no momentum).
    Soft assignments (N, K) mix the contexts' transforms; unknown contexts use the
    posterior under the learned Gaussians, in training too.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float = 1e-5,
        affine: bool = True,
        prior: Sequence[float] | Tensor | None = None,
        estimate_prior: bool = False,
        prior_scaling: bool = True,
        channel_last: bool = False,
    ) -> None:
        super().__init__(num_features, num_contexts, eps, affine, prior, estimate_prior, prior_scaling, channel_last)
        self.mean = nn.Parameter(torch.zeros(num_contexts, num_features))
        self.raw_std = nn.Parameter(torch.full((num_contexts, num_features), _SOFTPLUS_OF_ONE))
        self._init_affine((num_contexts, num_features))

    @property
    def std(self) -> Tensor:
        return nnf.softplus(self.raw_std)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mean)
        nn.init.constant_(self.raw_std, _SOFTPLUS_OF_ONE)
        self._reset_affine()
        self.reset_prior()

    def _load_batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        self.mean.copy_(mean.expand_as(self.mean))
        self.raw_std.copy_(inverse_softplus(var.clamp_min(self.eps).sqrt()).expand_as(self.raw_std))

    def _context_statistics(
        self, x: Tensor, assignment: ContextAssignment, moments: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        std = self.std
        return self.mean, std * std


class ContextNormE(_ContextNormBase):
    r"""CN-E: statistics from a learned map of the context's encoding (000 §4 ACN-base; 004 SCB-Norm-base).

    ``mu = f_mu(e)``, ``sigma = softplus(f_sigma(e))`` with ``e`` the one-hot encoding of
    the context id, or any soft assignment (N, K) given as ``context`` (encoded as it is,
    not as a mix of the contexts' transforms). ``f`` is one linear layer, or a small MLP
    with ``hidden_features``. The affine ``gamma, beta`` (C,) is shared. Unknown contexts
    use the posterior over the K encoded contexts. The maps start at ``mu = 0, sigma = 1``.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float = 1e-5,
        affine: bool = True,
        prior: Sequence[float] | Tensor | None = None,
        estimate_prior: bool = False,
        prior_scaling: bool = True,
        hidden_features: int | None = None,
        channel_last: bool = False,
    ) -> None:
        super().__init__(num_features, num_contexts, eps, affine, prior, estimate_prior, prior_scaling, channel_last)
        self.hidden_features = None if hidden_features is None else check_count("hidden_features", hidden_features)
        self.mean_encoder = self._encoder()
        self.std_encoder = self._encoder()
        self._init_affine((num_features,))
        self.reset_parameters()

    def _encoder(self) -> nn.Module:
        if self.hidden_features is None:
            return nn.Linear(self.num_contexts, self.num_features)
        return nn.Sequential(
            nn.Linear(self.num_contexts, self.hidden_features),
            nn.ReLU(),
            nn.Linear(self.hidden_features, self.num_features),
        )

    @staticmethod
    def _output_layer(encoder: nn.Module) -> nn.Linear:
        return encoder if isinstance(encoder, nn.Linear) else encoder[-1]

    def reset_parameters(self) -> None:
        for encoder, start in ((self.mean_encoder, 0.0), (self.std_encoder, _SOFTPLUS_OF_ONE)):
            for module in encoder.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            output = self._output_layer(encoder)
            nn.init.zeros_(output.weight)
            nn.init.constant_(output.bias, start)
        self._reset_affine()
        self.reset_prior()

    def _load_batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        self._output_layer(self.mean_encoder).bias.copy_(mean)
        self._output_layer(self.std_encoder).bias.copy_(inverse_softplus(var.clamp_min(self.eps).sqrt()))

    def encode(self, encoding: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance (N, C) for encodings (N, K)."""
        std = nnf.softplus(self.std_encoder(encoding))
        return self.mean_encoder(encoding), std * std

    def _context_statistics(
        self, x: Tensor, assignment: ContextAssignment, moments: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        return self.encode(torch.eye(self.num_contexts, device=x.device, dtype=assignment.weights.dtype))

    def _coefficients(
        self,
        mean: Tensor,
        var: Tensor,
        assignment: ContextAssignment,
        moments: tuple[Tensor, Tensor] | None,
        positions: int,
    ) -> tuple[Tensor, Tensor]:
        if not assignment.soft:
            return super()._coefficients(mean, var, assignment, moments, positions)
        sample_mean, sample_var = self.encode(assignment.weights)
        gain = self._gain()
        sample_gain = None if gain is None else assignment.weights @ gain
        return F.affine_coefficients(sample_mean, sample_var, self.eps, sample_gain, self.weight, self.bias)

    def _extra_repr_parts(self) -> list[str]:
        return [] if self.hidden_features is None else [f"hidden_features={self.hidden_features}"]
