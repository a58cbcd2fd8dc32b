"""The mixture layers (ACN, MixNorm): math, gradients, inference, numerics, contracts."""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from torch import nn

import contextnorm as cn
from contextnorm import functional as F
from contextnorm.layers import diagnostics

K = 3
C = 5
LAYOUTS = ("channel_first", "dense", "channel_last")


def make(name: str, **options) -> nn.Module:
    builders = {
        "acn_momentum": lambda: cn.AdaptiveContextNorm(C, K, update="momentum", **options),
        "acn_gradient": lambda: cn.AdaptiveContextNorm(C, K, update="gradient", **options),
        "acn_eq15": lambda: cn.AdaptiveContextNorm(
            C, K, update="gradient", inference="mixture", **options
        ),
        "mixnorm": lambda: cn.MixtureNorm(C, K, **options),
    }
    torch.manual_seed(0)
    layer = builders[name]()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return layer


MIXTURES = ("acn_momentum", "acn_gradient", "acn_eq15", "mixnorm")
ACNS = ("acn_momentum", "acn_gradient", "acn_eq15")


def clustered(
    n: int = 8,
    spatial: tuple[int, ...] = (3, 2),
    dtype=torch.float32,
    seed: int = 1,
    spread: float = 3.0,
):
    """Positions drawn from K well-separated clusters, (n, C, *spatial)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K, (n, 1, *spatial), generator=generator)
    noise = torch.randn(n, C, *spatial, generator=generator, dtype=torch.float64)
    return (noise + spread * ids - spread).to(dtype)


def in_layout(x3: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, C, L) data as a channel-first map, a dense (N*L, C) batch, or channel-last tokens."""
    if layout == "channel_first":
        return x3
    if layout == "dense":
        return x3.transpose(1, 2).reshape(-1, x3.shape[1])
    return x3.transpose(1, 2).contiguous()


def gradcheck_fresh(layer: nn.Module, x: torch.Tensor, **options) -> bool:
    """gradcheck of ``layer(x)`` w.r.t. ``x`` and every parameter, on a fresh copy per evaluation.

    Every evaluation starts from the same saved state, so an update of running estimates
    made by one evaluation cannot hide a wrong gradient by changing what the next computes.
    """
    saved = copy.deepcopy(layer)
    names = [name for name, _ in saved.named_parameters()]
    parameters = [p.detach().clone().requires_grad_() for _, p in saved.named_parameters()]

    def function(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            copy.deepcopy(saved), dict(zip(names, values, strict=True)), (x,)
        )

    settings = {"eps": 1e-6, "atol": 1e-5, "rtol": 1e-3, **options}
    return torch.autograd.gradcheck(
        function, (x.detach().clone().requires_grad_(), *parameters), **settings
    )


# --- the transform against a plain reference ------------------------------------------------------


def reference_mixture_norm(
    x3, log_prior, mean, var, eps, gain, weight, bias, posterior_grad=True, floor=0.0
):
    """The posterior-weighted transform (arXiv:2403.16798 Eq. 5-9), one component at a time.

    ``floor``: each ``v_k`` is raised to at least this fraction of the batch's variance.
    """
    points = x3.transpose(1, 2).reshape(-1, x3.shape[1])
    log_joint = (
        torch.distributions.Normal(mean, var.sqrt()).log_prob(points[:, None, :]).sum(2) + log_prior
    )
    tau = torch.softmax(log_joint, 1)
    if not posterior_grad:
        tau = tau.detach()
    mass = tau.sum(0)
    if gain is None:
        gain = (mass / mass.sum()).rsqrt()
    out = torch.zeros_like(points)
    for k in range(mean.shape[0]):
        tauhat = tau[:, k] / tau[:, k].sum()
        mu = (tauhat[:, None] * points).sum(0)
        v = (tauhat[:, None] * (points - mu) ** 2).sum(0)
        v = torch.maximum(v, floor * points.var(0, correction=0))
        out = out + tau[:, k, None] * gain[k] * (points - mu) / torch.sqrt(v + eps)
    n, _, length = x3.shape
    return (out * weight + bias).reshape(n, length, -1).transpose(1, 2)


def mixture_inputs():
    generator = torch.Generator().manual_seed(2)
    double = {"dtype": torch.float64}
    log_prior = torch.log_softmax(torch.randn(K, generator=generator, **double), 0)
    mean = torch.randn(K, C, generator=generator, **double) * 2 + 3
    var = torch.rand(K, C, generator=generator, **double) * 3 + 1
    gain = torch.rand(K, generator=generator, **double) + 0.5
    weight = torch.randn(C, generator=generator, **double)
    bias = torch.randn(C, generator=generator, **double)
    return [t.requires_grad_() for t in (log_prior, mean, var, gain, weight, bias)]


def fused(
    x3, log_prior, mean, var, gain, weight, bias, posterior_grad=True, batch_gain=False, floor=0.0
):
    view = F.positions_view(x3)
    reference = view.detach().mean((0, 2))
    coefficients = F.log_joint_coefficients(log_prior, mean, var, reference)
    out, _ = F.batch_mixture_norm(
        view,
        *coefficients,
        1e-5,
        None if batch_gain else gain,
        weight,
        bias,
        posterior_grad=posterior_grad,
        reference=reference,
        variance_floor=floor,
    )
    return F.from_positions_view(out, x3.shape[0], x3.shape[2])


def layout_batch(layout: str) -> torch.Tensor:
    """(N, C, L) float64 data laid out channel-first, dense or channel-last in memory."""
    x = in_layout(clustered(4, (6,), torch.float64) + 3.0, layout)
    return (
        x.unsqueeze(2)
        if layout == "dense"
        else (x.transpose(1, 2) if layout == "channel_last" else x)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("posterior_grad", [True, False])
@pytest.mark.parametrize("batch_gain", [False, True])
@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_fused_transform_and_its_gradient_equal_the_reference(
    layout: str, posterior_grad: bool, batch_gain: bool, floor: float
) -> None:
    """Floor 0.3 binds for some components and channels (clusters 3 apart, of unit spread)."""
    x3 = layout_batch(layout)
    inputs = mixture_inputs()
    log_prior, mean, var, gain, weight, bias = inputs
    x1, x2 = x3.detach().clone().requires_grad_(), x3.detach().clone().requires_grad_()
    got = fused(x1, *inputs, posterior_grad=posterior_grad, batch_gain=batch_gain, floor=floor)
    expected = reference_mixture_norm(
        x2,
        log_prior,
        mean,
        var,
        1e-5,
        None if batch_gain else gain,
        weight,
        bias,
        posterior_grad,
        floor,
    )
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    upstream = torch.randn_like(expected)
    wanted = [x1, mean, var, log_prior, weight, bias] if posterior_grad else [x1, weight, bias]
    if not batch_gain:
        wanted.append(gain)
    got_grads = torch.autograd.grad(got, wanted, upstream)
    wanted[0] = x2
    expected_grads = torch.autograd.grad(expected, wanted, upstream)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize(
    "layout, batch_gain, floor",
    [(layout, False, 0.0) for layout in LAYOUTS]
    + [("channel_first", True, 0.0), ("channel_first", False, 0.3)],
)
def test_fused_transform_passes_gradcheck(layout: str, batch_gain: bool, floor: float) -> None:
    x3 = layout_batch(layout).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: fused(*a, batch_gain=batch_gain, floor=floor),
        (x3[:2], *mixture_inputs()),
        eps=1e-6,
        atol=1e-6,
    )


def test_posterior_in_log_space_matches_direct_densities() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(40, C, generator=generator, dtype=torch.float64) * 2 + 1
    mean = torch.randn(K, C, generator=generator, dtype=torch.float64)
    var = torch.rand(K, C, generator=generator, dtype=torch.float64) + 0.5
    direct = torch.stack(
        [
            torch.distributions.Normal(mean[k], var[k].sqrt()).log_prob(points).sum(1)
            for k in range(K)
        ],
        1,
    )
    torch.testing.assert_close(F.diag_gaussian_log_density(points, mean, var), direct)


# --- gradients of the layers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ACNS)
@pytest.mark.parametrize("training", [True, False])
def test_acn_gradcheck_on_fresh_copies(name: str, training: bool) -> None:
    """Momentum mode included: a gain read from the prior after the batch's update fails here."""
    layer = make(name, prior_scaling=True).double()
    x = clustered(4, (2, 2), torch.float64)
    layer(x)  # running estimates away from their start
    layer.train(training)
    assert gradcheck_fresh(layer, x)


class _GainAfterUpdate(cn.AdaptiveContextNorm):
    """A deliberately wrong ACN: its gain reads the prior after this batch's momentum update."""

    def _normalize(self, view: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            log_prior, mean, var = self._mixture(view.dtype)
            reference = view.mean((0, 2))
            centred = view - reference.view(1, -1, 1)
            coefficients = F.log_joint_coefficients(log_prior, mean, var, reference)
            tau = torch.softmax(F.log_joint(centred, centred * centred, *coefficients), 1)
            self.updated_prior = torch.lerp(
                self.running_prior.to(view.dtype), tau.mean((0, 2)), self.momentum
            )
        return super()._normalize(view)

    def _gain(self, log_prior: torch.Tensor) -> torch.Tensor:
        return self.updated_prior.rsqrt()


def test_fresh_copy_gradcheck_catches_state_read_after_the_update() -> None:
    """The check above can fail: an output that depends on x through the update is caught."""
    layer = _GainAfterUpdate(C, K, prior_scaling=True).double()
    x = clustered(4, (2, 2), torch.float64)
    layer(x)
    assert not gradcheck_fresh(layer, x, raise_exception=False)


def test_mixnorm_gradcheck_in_eval() -> None:
    layer = make("mixnorm").double()
    x = clustered(4, (2, 2), torch.float64)
    layer(x)
    layer(x)
    assert gradcheck_fresh(layer.eval(), x)


def test_mixnorm_training_gradient_treats_the_posterior_as_a_constant() -> None:
    """Output and gradient in training: the reference with the EM fit's posterior held constant."""
    layer = make("mixnorm", prior_scaling=True).double()
    x = clustered(6, (2, 2), torch.float64)
    layer(x)
    fit_state = copy.deepcopy(layer)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(4)
    y = layer(x1)
    torch.manual_seed(4)
    view = F.positions_view(x.reshape(6, C, -1))
    reference = view.mean((0, 2))
    log_prior, mean, var = fit_state._fit_batch(view, reference)
    expected = reference_mixture_norm(
        x2.reshape(6, C, -1),
        log_prior,
        mean + reference,
        var + layer.eps,
        layer.eps,
        None,
        layer.weight,
        layer.bias,
        posterior_grad=False,
        floor=layer.variance_floor,
    ).reshape(x.shape)
    torch.testing.assert_close(y, expected)
    upstream = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x1, upstream)[0], torch.autograd.grad(expected, x2, upstream)[0]
    )


# --- equality with BatchNorm where the math says so -----------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_component_acn_in_gradient_mode_is_batchnorm(momentum: float | None) -> None:
    """K = 1: posterior 1, gain 1, the batch's moments: BatchNorm, running estimates included."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, momentum=momentum).double()
    layer = cn.AdaptiveContextNorm(C, 1, update="gradient", momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
    for step in range(3):
        x = torch.randn(8, C, 4, 4, dtype=torch.float64) * (step + 1) + step
        x_bn, x_acn = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_bn, y_acn = bn(x_bn), layer(x_acn)
        torch.testing.assert_close(y_acn, y_bn)
        upstream = torch.randn_like(x)
        y_bn.backward(upstream)
        y_acn.backward(upstream)
        torch.testing.assert_close(x_acn.grad, x_bn.grad)
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad)
    torch.testing.assert_close(layer.bias.grad, bn.bias.grad)
    torch.testing.assert_close(layer.running_mean[0], bn.running_mean)
    torch.testing.assert_close(layer.running_var[0], bn.running_var)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked)
    bn.eval()
    layer.eval()
    x = torch.randn(8, C, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x))


def test_one_component_acn_in_momentum_mode_trains_as_batchnorm() -> None:
    bn = nn.BatchNorm2d(C)
    layer = cn.AdaptiveContextNorm(C, 1)
    x = torch.randn(8, C, 4, 4) * 3 + 2
    torch.testing.assert_close(layer(x), bn(x), atol=1e-5, rtol=1e-5)


# --- inference computes what training computed ----------------------------------------------------


def stationary_stream(seed: int):
    """A stationary 3-component mixture over 8 channels, drawn per position."""
    generator = torch.Generator().manual_seed(1000 + seed)
    centres = torch.randn(K, 8, generator=generator) * 3
    spreads = torch.rand(K, 8, generator=generator) * 1.5 + 0.5

    def draw(n: int = 32, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, K, (n, size, size), generator=generator)
        x = torch.randn(n, size, size, 8, generator=generator) * spreads[ids] + centres[ids]
        return x.permute(0, 3, 1, 2).contiguous(), ids.flatten(1).mode(1).values

    return draw


GAP_LAYERS = {
    "bn": lambda: nn.BatchNorm2d(8),
    "cn": lambda: cn.ContextNorm(8, K),
    "modenorm": lambda: cn.ModeNorm(8, K),
    "switchnorm": lambda: cn.SwitchNorm(8),
    "acn_momentum": lambda: cn.AdaptiveContextNorm(8, K, update="momentum"),
    "acn_gradient": lambda: cn.AdaptiveContextNorm(8, K, update="gradient"),
    "mixnorm": lambda: cn.MixtureNorm(8, K),
}


@functools.cache
def train_eval_gap_after_training(name: str, seed: int, steps: int = 200) -> float:
    """Mean |y_train - y_eval| on a fresh batch after ``steps`` Adam steps of a classifier."""
    torch.manual_seed(seed)
    draw = stationary_stream(seed)
    layer = GAP_LAYERS[name]()
    head = nn.Linear(8, K)
    optimizer = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    call = (
        (lambda m, x, ids: m(x, ids))
        if getattr(layer, "uses_context", False)
        else (lambda m, x, ids: m(x))
    )
    for _ in range(steps):
        x, ids = draw()
        loss = nn.functional.cross_entropy(head(call(layer, x, ids).mean((2, 3))), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, ids = draw()
    with torch.no_grad():
        return (
            (call(copy.deepcopy(layer).train(), x, ids) - call(layer.eval(), x, ids))
            .abs()
            .mean()
            .item()
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in GAP_LAYERS if n != "bn"])
def test_eval_mode_computes_what_training_computed(name: str) -> None:
    """Stationary stream: each layer with running estimates within 3x BatchNorm's gap, each seed."""
    for seed in (0, 1, 2):
        reference = train_eval_gap_after_training("bn", seed)
        gap = train_eval_gap_after_training(name, seed)
        assert gap <= 3 * reference, (seed, gap, reference)


def test_papers_inference_departs_from_training_in_gradient_mode() -> None:
    """The papers' inference (the learned mixture) is an option; it is not what training used."""
    torch.manual_seed(0)
    layer = cn.AdaptiveContextNorm(8, K, update="gradient", inference="mixture", momentum=None)
    draw = stationary_stream(0)
    for _ in range(20):
        layer(draw()[0])
    x = draw()[0]
    with torch.no_grad():
        trained = copy.deepcopy(layer)(x)
        literal = layer.eval()(x)
        layer.inference = "running"
        running = layer(x)
    assert (trained - literal).abs().mean() > 10 * (trained - running).abs().mean()


# --- MixNorm's per-batch EM -----------------------------------------------------------------------


def test_mixnorm_components_keep_their_identity_across_batches() -> None:
    """EM starts from the running mixture: no label switching, the running means on the clusters."""
    torch.manual_seed(0)
    centres = torch.tensor([[-8.0, 0.0], [0.0, 8.0], [8.0, 0.0]])
    layer = cn.MixtureNorm(2, K, momentum=0.2)
    for _ in range(30):
        ids = torch.randint(0, K, (256,))
        layer(torch.randn(256, 2) + centres[ids])
    distance = torch.cdist(layer.running_mean, centres)
    assert sorted(distance.argmin(1).tolist()) == [0, 1, 2]
    assert distance.min(1).values.max() < 0.3
    torch.testing.assert_close(layer.running_var, torch.ones(K, 2), atol=0.3, rtol=0)


def test_mixnorm_variance_floor_is_relative_to_the_batch() -> None:
    """A component on one repeated point would get zero variance; the floor keeps a share."""
    x = torch.cat([torch.zeros(40, 2), torch.randn(40, 2) * 10 + 30])
    layer = cn.MixtureNorm(2, 2, variance_floor=0.01)
    layer(x)
    batch_var = x.var(0, correction=0)
    assert bool((layer.running_var >= 0.01 * batch_var - 1e-4).all())
    assert torch.isfinite(layer.eval()(x)).all()


def test_kmeans_seeding_with_matching_pairs_components() -> None:
    centres = torch.tensor([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([c + torch.randn(200, 2, generator=generator) for c in centres])
    torch.manual_seed(0)
    seeds = F.kmeans_plus_plus(points, K, generator)
    uniform = torch.full((K,), -math.log(K))
    _, mean, var = F.fit_diag_gmm(points, uniform, seeds, points.var(0).expand(K, -1), 10, 1e-5)
    order = F.match_components(mean, centres, torch.ones(K, 2))
    torch.testing.assert_close(mean[order], centres, atol=0.3, rtol=0)
    torch.testing.assert_close(var[order], torch.ones(K, 2), atol=0.3, rtol=0)
    layer = cn.MixtureNorm(2, K, seeding="kmeans++", momentum=0.5)
    for _ in range(10):
        layer(points)
    assert torch.cdist(layer.running_mean, centres).min(1).values.max() < 0.3


# --- precision ------------------------------------------------------------------------------------


def float32_error(layer: nn.Module, x64: torch.Tensor) -> float:
    """Max |float32 layer - float64 layer| on the same (float32-representable) input, training mode.

    The layer first trains on three batches of the same data, so that a mixture sits on the
    data as it does in a trained network (a mixture far from the data has a posterior that is
    ill-conditioned at any precision).
    """
    with torch.no_grad():
        for shift in (0.1, -0.1, 0.0):
            layer(x64.float() + shift)
    wide = copy.deepcopy(layer).double()
    x32 = x64.float()
    torch.manual_seed(3)
    narrow_out = layer(x32)
    torch.manual_seed(3)
    wide_out = wide(x32.double())
    return (narrow_out.double() - wide_out).abs().max().item()


@pytest.mark.parametrize("name", ["acn_momentum", "acn_gradient", "mixnorm"])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_float32_error_far_from_zero_within_ten_times_batchnorm(name: str, offset: float) -> None:
    x = clustered(16, (4, 4), torch.float64) + offset
    bn_error = float32_error(nn.BatchNorm2d(C), x)
    error = float32_error(make(name), x)
    assert error <= 10 * bn_error, (error, bn_error)
    # Far from zero is no worse than near zero: the math runs on centred values.
    assert error <= 10 * float32_error(make(name), x - offset) + 1e-6


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_autocast_matches_float32_within_the_dtypes_tolerance(
    name: str, dtype: torch.dtype, scale: float
) -> None:
    """Posteriors and moments in float32 under autocast; output in the autocast dtype, as BN's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 1)
    x = clustered(8, (4, 4)) * scale
    results = {}
    for label, make_layer in (("bn", lambda: nn.BatchNorm2d(C)), (name, lambda: make(name))):
        layer = make_layer()
        reference = copy.deepcopy(layer)
        with torch.autocast("cpu", dtype=dtype):
            h = conv(x)
            torch.manual_seed(7)
            y = layer(h)
        assert y.dtype == h.dtype == dtype
        torch.manual_seed(7)
        expected = reference(h.float())
        y.float().sum().backward()
        for buffer in layer.buffers():
            if buffer.is_floating_point():
                assert buffer.dtype == torch.float32 and torch.isfinite(buffer).all()
        results[label] = (y.float(), expected, torch.isfinite(conv.weight.grad).all())
        conv.zero_grad()
    tolerance = {torch.bfloat16: 1.6e-2, torch.float16: 1e-3}[dtype]
    for label, (y, expected, finite_grad) in results.items():
        assert torch.isfinite(y).all() and finite_grad
        # Relative to the output's scale, which the 1/sqrt(lambda) gain can make larger than BN's.
        error = (y - expected).abs().max() / expected.abs().max()
        assert error <= 2 * tolerance, (label, error)


# --- torch.compile --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("update", ["momentum", "gradient"])
@pytest.mark.parametrize("training", [True, False])
def test_acn_compiles_without_graph_breaks_and_matches_eager(update: str, training: bool) -> None:
    torch.manual_seed(0)
    layer = cn.AdaptiveContextNorm(C, K, update=update, momentum=0.5).train(training)
    x = clustered(8, (4, 4))
    layer.train()(x)
    layer.train(training)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), compiled(x2)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(y1)
    y1.backward(upstream)
    y2.backward(upstream)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(layer.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, a), b in zip(layer.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_mixnorm_eval_compiles_without_graph_breaks() -> None:
    layer = make("mixnorm")
    x = clustered(8, (4, 4))
    layer(x)
    layer.eval()
    compiled = torch.compile(copy.deepcopy(layer), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


# --- BatchNorm's contracts ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, C, 4, 4), (0, C), (3, C, 0)])
def test_empty_batch_gives_empty_output_and_leaves_state_untouched(
    name: str, training: bool, shape
) -> None:
    layer = make(name)
    layer(clustered(8, (2, 2)))
    layer.train(training)
    state = copy.deepcopy(layer.state_dict())
    x = torch.zeros(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="expected 5 channels"):
        layer(torch.zeros(0, C + 1, 2))


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("training", [True, False])
def test_reset_running_stats_and_reset_parameters_mean_what_batchnorm_means(
    name: str, training: bool
) -> None:
    layer = make(name)
    for _ in range(3):
        layer(clustered(8, (2, 2)) * 3 + 1)
    layer.train(training)
    parameters = {key: value.clone() for key, value in layer.named_parameters()}
    layer.reset_running_stats()
    assert layer.training is training
    for key, value in layer.named_parameters():
        assert torch.equal(value, parameters[key]), key
    assert int(layer.num_batches_tracked) == 0
    torch.testing.assert_close(layer.running_prior, torch.full((K,), 1 / K))
    torch.testing.assert_close(layer.running_var, torch.ones(K, C))
    if name != "acn_momentum":  # there the running means are the mixture's: drawn afresh
        torch.testing.assert_close(layer.running_mean, torch.zeros(K, C))
    layer.reset_parameters()
    assert layer.training is training
    assert torch.equal(layer.weight, torch.ones(C)) and torch.equal(layer.bias, torch.zeros(C))


@pytest.mark.parametrize("name", MIXTURES)
def test_state_dict_round_trip(name: str) -> None:
    layer = make(name)
    x = clustered(8, (2, 2))
    for _ in range(2):
        layer(x)
    layer.eval()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(name)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh.eval()(x), layer(x))


def test_count_keyword_context_argument_device_and_dtype() -> None:
    for layer_class in (cn.AdaptiveContextNorm, cn.MixtureNorm):
        with pytest.warns(FutureWarning, match="num_components is renamed num_contexts"):
            old = layer_class(C, num_components=K)
        assert old.num_contexts == K
        with pytest.raises(ValueError, match="disagree"), pytest.warns(FutureWarning):
            layer_class(C, 2, num_components=K)
        with pytest.raises(TypeError, match="num_contexts"):
            layer_class(C)
        layer = layer_class(C, num_contexts=K, dtype=torch.float64, device="cpu")
        assert all(
            t.dtype == torch.float64
            for t in (*layer.parameters(), *layer.buffers())
            if t.is_floating_point()
        )
        x = clustered(4, (2, 2), torch.float64)
        torch.manual_seed(0)
        expected = copy.deepcopy(layer)(x)
        torch.manual_seed(0)
        torch.testing.assert_close(layer(x, torch.zeros(4, dtype=torch.long)), expected)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: cn.AdaptiveContextNorm(C, K, update="adam"), "update must be one of"),
        (lambda: cn.AdaptiveContextNorm(C, K, inference="batch"), "inference must be one of"),
        (
            lambda: cn.AdaptiveContextNorm(C, K, track_running_stats=False),
            "needs track_running_stats=True",
        ),
        (lambda: cn.MixtureNorm(C, K, seeding="random"), "seeding must be"),
        (lambda: cn.MixtureNorm(C, K, variance_floor=1.5), "variance_floor must be"),
        (lambda: cn.MixtureNorm(C, 0), "num_contexts must be a positive integer"),
    ],
)
def test_bad_arguments_name_the_fix(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("layout", ["dense", "channel_last"])
@pytest.mark.parametrize("name", MIXTURES)
def test_layouts_equal_channel_first(name: str, layout: str) -> None:
    x3 = clustered(4, (6,))
    first, other = make(name), make(name, channel_last=layout == "channel_last")
    torch.manual_seed(5)
    expected = first(x3)
    torch.manual_seed(5)
    got = other(in_layout(x3, layout))
    torch.testing.assert_close(got, in_layout(expected, layout), atol=1e-5, rtol=1e-5)


def test_gradient_mode_without_running_estimates_uses_batch_statistics_in_eval() -> None:
    layer = cn.AdaptiveContextNorm(C, K, update="gradient", track_running_stats=False)
    x = clustered(8, (2, 2))
    torch.testing.assert_close(layer.eval()(x), layer.train()(x))
    assert layer.running_mean is None


# --- diagnostics ----------------------------------------------------------------------------------


def test_mixture_diagnostics_report_weights_and_certainty() -> None:
    """Two far-apart clusters with shares 3:1: two components in use, certain posteriors."""
    torch.manual_seed(0)
    layer = cn.AdaptiveContextNorm(2, 2, momentum=0.5)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))
    model = nn.Sequential(nn.Identity(), layer)
    for _ in range(20):
        x = torch.cat(
            [
                torch.randn(300, 2) - torch.tensor([10.0, 0.0]),
                torch.randn(100, 2) + torch.tensor([10.0, 0.0]),
            ]
        )
        model(x)
    report = diagnostics.mixture_diagnostics(model)
    assert list(report) == ["1"]
    d = report["1"]
    torch.testing.assert_close(d.weights, torch.tensor([0.75, 0.25]), atol=0.02, rtol=0)
    expected_used = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert abs(float(d.used_components) - expected_used) < 0.05
    assert float(d.posterior_entropy) < 1e-3 and abs(float(d.components_per_position) - 1) < 1e-3
    assert 0.005 < float(d.min_variance_ratio) < 0.05  # unit clusters 20 apart


def test_mixture_diagnostics_see_a_collapsed_component() -> None:
    layer = cn.MixtureNorm(2, 2, variance_floor=0.0)
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([[1e-6, 1.0], [1.0, 1.0]]))
    assert float(diagnostics.mixture_diagnostics(layer)[""].min_variance_ratio) < 1e-5


def test_train_eval_gap_of_every_layer_with_running_estimates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        cn.ModeNorm(8, 2),
        cn.ContextNormX(8, 2),
        cn.MixtureNorm(8, 2),
        cn.SwitchNorm(8),
        cn.AdaptiveContextNorm(8, 2, update="gradient", inference="mixture"),
    )
    model.train()
    for _ in range(30):
        with cn.use_context(torch.randint(0, 2, (16,))):
            model(torch.randn(16, 3, 4, 4))
    x, context = torch.randn(16, 3, 4, 4), torch.randint(0, 2, (16,))
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    with cn.use_context(context):
        gaps = diagnostics.train_eval_gap(model, x)
    assert list(gaps) == ["1", "2", "4", "5", "6"]  # CN-X has no running estimates
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # Eq. 15 inference departs from training: the largest gap, far above BatchNorm's.
    assert gaps["6"].absolute == max(g.absolute for g in gaps.values())
    assert gaps["6"].relative > 3 * gaps["1"].relative
    # Each number is the layer's own: BatchNorm's equals its gap measured alone.
    bn = model[1]
    h = model[0](x).detach()
    with torch.no_grad():
        alone = (copy.deepcopy(bn).train()(h) - copy.deepcopy(bn).eval()(h)).abs().mean().item()
    assert gaps["1"].absolute == pytest.approx(alone, rel=1e-5)
