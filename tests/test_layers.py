"""The math of every layer: gradients, equivalences, references, invariances, dtypes, state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import contextnorm as cn
from contextnorm import functional as F
from helpers import call, gradcheck_fresh, one_thread, reference_context_norm

K = 3
C = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def make_layer(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    # With the 1/sqrt(lambda) factor (off by default), so that every test covers it.
    layers = {
        "cn": lambda: cn.ContextNorm(C, K, prior_scaling=True),
        "cnx": lambda: cn.ContextNormX(C, K, prior_scaling=True),
        "cne": lambda: cn.ContextNormE(C, K, prior_scaling=True),
        "cne_mlp": lambda: cn.ContextNormE(C, K, hidden_features=4, prior_scaling=True),
        "acn_gradient": lambda: cn.AdaptiveContextNorm(C, K, update="gradient"),
        "acn_momentum": lambda: cn.AdaptiveContextNorm(C, K, update="momentum"),
        "mixnorm": lambda: cn.MixtureNorm(C, K),
        "modenorm": lambda: cn.ModeNorm(C, K),
        "switchnorm": lambda: cn.SwitchNorm(C),
    }
    torch.manual_seed(0)
    layer = layers[name]().to(dtype)
    if getattr(layer, "data_init", False):
        warm_up, context = batch(dtype)
        layer(warm_up, context)  # the data-dependent start, before the parameters are perturbed
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return layer


CONTEXT_LAYERS = ("cn", "cnx", "cne", "cne_mlp")
ALL_LAYERS = CONTEXT_LAYERS + ("acn_gradient", "acn_momentum", "mixnorm", "modenorm", "switchnorm")


def batch(
    dtype: torch.dtype = torch.float32, n: int = 9, spatial: tuple[int, ...] = (3, 2)
) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    context = torch.arange(n) % K
    x = torch.randn(n, C, *spatial, dtype=dtype) * 2 + context.view(
        -1, *([1] * (1 + len(spatial)))
    ).to(dtype)
    return x, context


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LAYERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_inputs_and_parameters(name: str, mode: str) -> None:
    if name == "mixnorm" and mode == "train":
        pytest.skip(
            "EM draws its seeds at random per call; its weighted transform is checked below"
        )
    layer = make_layer(name, torch.float64)
    x, context = batch(torch.float64, n=6, spatial=(3,))
    layer.train(mode == "train")
    if mode == "eval":
        call(layer.train(), x, context)
        layer.eval()
    assert gradcheck_fresh(layer, x, context)


@pytest.mark.parametrize("name", ["cnx", "cne", "cne_mlp", "cn"])
def test_gradcheck_unknown_contexts_through_the_posterior(name: str) -> None:
    layer = make_layer(name, torch.float64)
    x, context = batch(torch.float64, n=6, spatial=(3,))
    call(layer, x, context)
    layer.train(name != "cn")  # CN handles unknown contexts in eval, CN-X and CN-E in training too
    assert gradcheck_fresh(layer, x, torch.tensor([0, -1, 2, -1, 1, 0]))


def test_fused_backward_matches_plain_autograd() -> None:
    """The fused moment backward equals autograd through var_mean on a layer that uses both
    moments."""
    layer = make_layer("switchnorm", torch.float64)
    x, _ = batch(torch.float64)
    x1 = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    layer(x1).backward(grad)
    fused_grads = [x1.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()

    x2 = x.clone().requires_grad_()
    x3 = x2.reshape(x.shape[0], C, -1)
    var, mean = torch.var_mean(x3, dim=2, correction=0)
    layer_mean = mean.mean(1, keepdim=True)
    layer_var = (var + (mean - layer_mean) ** 2).mean(1, keepdim=True)
    batch_mean = mean.mean(0, keepdim=True)
    batch_var = (var + (mean - batch_mean) ** 2).mean(0, keepdim=True)
    wm, wv = torch.softmax(layer.mean_logits, 0), torch.softmax(layer.var_logits, 0)
    m = wm[0] * mean + wm[1] * layer_mean + wm[2] * batch_mean
    v = wv[0] * var + wv[1] * layer_var + wv[2] * batch_var
    y = (x3 - m.unsqueeze(-1)) / torch.sqrt(v.unsqueeze(-1) + layer.eps) * layer.weight.view(
        1, -1, 1
    ) + layer.bias.view(1, -1, 1)
    y.reshape(x.shape).backward(grad)
    plain_grads = [x2.grad] + [p.grad for p in layer.parameters()]
    for fused, plain in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(fused, plain)


def test_double_backward_is_refused_clearly() -> None:
    layer = make_layer("cn")
    x, context = batch()
    x.requires_grad_()
    (grad,) = torch.autograd.grad(layer(x, context).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        grad.sum().backward()


# --- CN against BatchNorm and against a loop reference ------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("prior_scaling", [True, False])
def test_cn_with_one_context_is_batchnorm(momentum: float | None, prior_scaling: bool) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, momentum=momentum)
    layer = cn.ContextNorm(C, 1, momentum=momentum, prior_scaling=prior_scaling)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
    for step in range(3):
        x = torch.randn(8, C, 4, 4) * (step + 1) + step
        context = torch.zeros(8, dtype=torch.long)
        x_bn, x_cn = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_bn, y_cn = bn(x_bn), layer(x_cn, context)
        torch.testing.assert_close(y_cn, y_bn, atol=2e-5, rtol=1e-5)
        grad = torch.randn_like(x)
        y_bn.backward(grad)
        y_cn.backward(grad)
        torch.testing.assert_close(x_cn.grad, x_bn.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad[0], bn.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad[0], bn.bias.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.running_mean[0], bn.running_mean)
    torch.testing.assert_close(layer.running_var[0], bn.running_var)
    assert int(layer.num_batches_tracked[0]) == int(bn.num_batches_tracked)
    bn.eval()
    layer.eval()
    x = torch.randn(8, C, 4, 4)
    torch.testing.assert_close(
        layer(x, torch.zeros(8, dtype=torch.long)), bn(x), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("num_contexts", [2, 5, 40])
def test_cn_matches_per_context_loop(num_contexts: int) -> None:
    torch.manual_seed(0)
    layer = cn.ContextNorm(
        C, num_contexts, prior=torch.rand(num_contexts) + 0.1, prior_scaling=True
    ).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    context = torch.randint(0, num_contexts, (64,))
    x = torch.randn(64, C, 3, 3, dtype=torch.float64) * 3 + context.view(-1, 1, 1, 1)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1, context)
    expected = reference_context_norm(x2, context, layer.weight, layer.bias, layer.prior, layer.eps)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(x)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channel_last", [False, True])
def test_cn_training_gradients_without_affine_channel_last_and_an_absent_context(
    affine: bool, channel_last: bool
) -> None:
    """Training CN with known ids runs one fused node: its hand-written backward is checked
    with no affine parameters, on channel-last input, and with a context absent from the
    batch (whose running statistics stay untouched)."""
    torch.manual_seed(0)
    layer = cn.ContextNorm(
        C, 4, affine=affine, prior_scaling=True, channel_last=channel_last
    ).double()
    x = (torch.randn(6, 5, C) if channel_last else torch.randn(6, C, 5)).double()
    context = torch.tensor([0, 2, 2, 0, 1, 0])
    assert gradcheck_fresh(layer, x, context)
    call(layer, x, context)
    assert torch.equal(layer.running_mean[3], torch.zeros(C, dtype=torch.float64))
    assert torch.equal(layer.running_var[3], torch.ones(C, dtype=torch.float64))
    assert layer.num_batches_tracked.tolist() == [1, 1, 1, 0]


def test_cn_running_statistics_per_context_and_absent_contexts_untouched() -> None:
    layer = cn.ContextNorm(C, 4, momentum=0.5)
    x = torch.randn(6, C, 3, 3) * 2 + 1
    context = torch.tensor([0, 0, 2, 2, 2, 0])
    layer(x, context)
    for k in (1, 3):
        assert torch.equal(layer.running_mean[k], torch.zeros(C))
        assert torch.equal(layer.running_var[k], torch.ones(C))
    assert layer.num_batches_tracked.tolist() == [1, 0, 1, 0]
    rows = x[context == 2]
    expected_mean = 0.5 * rows.mean((0, 2, 3))
    expected_var = 0.5 + 0.5 * rows.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_mean[2], expected_mean)
    torch.testing.assert_close(layer.running_var[2], expected_var)


def test_cn_eval_and_cnx_match_the_per_context_reference() -> None:
    """Outputs, and gradients of the one-node backward against autograd through the loop."""
    x, context = batch()
    cnx = make_layer("cnx")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = cnx(x1, context)
    expected = reference_context_norm(
        x2, context, cnx.weight, cnx.bias, cnx.prior, cnx.eps, (cnx.mean, cnx.std**2)
    )
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(x)
    fused = torch.autograd.grad(got, (x1, *cnx.parameters()), upstream)
    plain = torch.autograd.grad(expected, (x2, *cnx.parameters()), upstream)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    layer = make_layer("cn")
    layer(x * 2 + 1, context)
    layer.eval()
    statistics = (layer.running_mean, layer.running_var)
    prior = layer.prior if layer.prior_scaling else None
    expected = reference_context_norm(
        x, context, layer.weight, layer.bias, prior, layer.eps, statistics
    )
    torch.testing.assert_close(layer(x, context), expected)


@pytest.mark.parametrize("name", ["cnx", "cne", "cne_mlp"])
def test_learned_statistics_start_from_each_contexts_first_training_batch(name: str) -> None:
    """Data-dependent start (as Glow's ActNorm): the first batch comes out normalised per context
    (over the whole batch for the MLP encoder), contexts seen later start from their own batch."""
    options = {"hidden_features": 4} if name == "cne_mlp" else {}
    layer = (cn.ContextNormX if name == "cnx" else cn.ContextNormE)(
        C, K, affine=False, prior_scaling=False, **options
    )
    torch.manual_seed(0)
    context = torch.tensor([0, 1] * 6)
    x = torch.randn(12, C, 4, 4) * 5 + 20 * context.view(-1, 1, 1, 1) + 3
    y = layer(x, context)
    groups = (
        [context == 0, context == 1] if name != "cne_mlp" else [torch.ones(12, dtype=torch.bool)]
    )
    for rows in groups:
        torch.testing.assert_close(y[rows].mean((0, 2, 3)), torch.zeros(C), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            y[rows].var((0, 2, 3), correction=0), torch.ones(C), atol=1e-3, rtol=0
        )
    assert layer.initialized.tolist() == ([True, True, False] if name != "cne_mlp" else [True] * 3)
    later = torch.randn(4, C, 4, 4) * 2 - 7
    y = layer(later, torch.full((4,), 2))
    if name != "cne_mlp":
        torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(C), atol=1e-4, rtol=0)
    assert layer.initialized.all()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x * 3, context)  # initialised contexts are not started again
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    unstarted = (cn.ContextNormX if name == "cnx" else cn.ContextNormE)(
        C, K, data_init=False, **options
    )
    unstarted(x, context)
    assert not unstarted.initialized.any()


def test_soft_one_hot_assignments_equal_hard_ids() -> None:
    x, context = batch()
    one_hot = nn.functional.one_hot(context, K).float()
    for name in ("cn", "cnx", "cne"):
        layer = make_layer(name)
        torch.testing.assert_close(layer(x, one_hot), layer(x, context), atol=1e-5, rtol=1e-5)


def test_cne_soft_assignment_encodes_the_mixture() -> None:
    layer = make_layer("cne")
    x, _ = batch()
    soft = torch.softmax(torch.randn(x.shape[0], K), 1)
    mean, var = layer.encode(soft)
    gain = soft @ layer.prior.rsqrt()
    expected = (
        (x - mean[..., None, None])
        / torch.sqrt(var[..., None, None] + layer.eps)
        * gain.view(-1, 1, 1, 1)
    )
    expected = expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x, soft), expected)


# --- invariances, layouts, priors -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LAYERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_permuting_the_batch_permutes_the_output(name: str, mode: str) -> None:
    if name == "mixnorm" and mode == "train":
        pytest.skip("EM seeding draws positions at random: a permuted batch gets a different fit")
    x, context = batch(n=12)
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    layer = make_layer(name)
    if mode == "eval":
        call(layer, x, context)
        layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    y = call(layer, x, context)
    layer.load_state_dict(state)
    y_permuted = call(layer, x[permutation], context[permutation])
    torch.testing.assert_close(y_permuted, y[permutation], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_LAYERS)
def test_channel_last_tokens_equal_channel_first(name: str) -> None:
    x, context = batch(spatial=(6,))
    first = make_layer(name)
    last = make_layer(name)
    last.channel_last = True
    torch.manual_seed(5)
    expected = call(first, x, context)
    torch.manual_seed(5)
    got = call(last, x.transpose(1, 2).contiguous(), context)
    torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_LAYERS)
def test_dense_inputs(name: str) -> None:
    x, context = batch(n=12, spatial=())
    y = call(make_layer(name), x, context)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_estimated_prior_converges_to_context_shares() -> None:
    layer = cn.ContextNorm(C, 3, estimate_prior=True)
    for _ in range(20):
        context = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
        layer(torch.randn(12, C, 2, 2), context)
    torch.testing.assert_close(layer.prior, torch.tensor([0.5, 0.25, 0.25]))


def test_given_prior_scales_by_inverse_square_root() -> None:
    x, context = batch()
    plain = cn.ContextNormX(C, K)
    scaled = cn.ContextNormX(C, K, prior=[0.5, 0.25, 0.25], prior_scaling=True)
    ratio = scaled(x, context) / plain(x, context)
    expected = torch.tensor([0.5, 0.25, 0.25])[context].rsqrt().view(-1, 1, 1, 1).expand_as(ratio)
    torch.testing.assert_close(ratio, expected)


# --- unknown contexts -----------------------------------------------------------------------------


def separated_contexts_layer(name: str) -> nn.Module:
    layer = make_layer(name)
    centres = torch.tensor([0.0, 20.0, 40.0]).unsqueeze(1).expand(K, C)
    with torch.no_grad():
        if name == "cn":
            layer.running_mean.copy_(centres)
            layer.running_var.fill_(1.0)
        elif name == "cnx":
            layer.mean.copy_(centres)
        else:
            layer._output_layer(layer.mean_encoder).weight.copy_(centres.t())
            layer._output_layer(layer.mean_encoder).bias.zero_()
    return layer.eval()


@pytest.mark.parametrize("name", ["cn", "cnx", "cne"])
def test_unknown_context_equals_known_when_posterior_is_certain(name: str) -> None:
    layer = separated_contexts_layer(name)
    context = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, C, 3, 3) + 20.0 * context.view(-1, 1, 1, 1)
    known = layer(x, context)
    torch.testing.assert_close(layer(x, None), known, atol=1e-5, rtol=1e-5)
    partly = torch.tensor([0, -1, 2, -1])
    torch.testing.assert_close(layer(x, partly), known, atol=1e-5, rtol=1e-5)
    with cn.use_context(None):
        torch.testing.assert_close(layer(x), known, atol=1e-5, rtol=1e-5)


def test_unknown_context_mixes_by_posterior_that_sums_to_one() -> None:
    layer = separated_contexts_layer("cnx")
    with torch.no_grad():
        layer.raw_std.fill_(5.0)  # equal spreads: the evidence for 0 and 1 balances exactly
    x = torch.full((1, C, 1, 1), 10.0)  # half way between contexts 0 and 1
    y = layer(x, None)
    y0 = layer(x, torch.tensor([0]))
    y1 = layer(x, torch.tensor([1]))
    torch.testing.assert_close(y, 0.5 * (y0 + y1), atol=1e-4, rtol=1e-4)


# --- mixture layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("update", ["gradient", "momentum"])
def test_acn_finite_for_large_activations(update: str) -> None:
    layer = cn.AdaptiveContextNorm(C, K, update=update)
    x = (torch.randn(8, C, 4, 4) * 1e4 + 1e4).requires_grad_()
    y = layer(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    layer.eval()
    assert torch.isfinite(layer(x)).all()


def test_acn_momentum_update_tracks_the_data() -> None:
    layer = cn.AdaptiveContextNorm(2, 1, momentum=0.5)
    for _ in range(30):
        layer(torch.randn(64, 2) * 3 + 7)
    torch.testing.assert_close(layer.mixture_mean, torch.full((1, 2), 7.0), atol=0.6, rtol=0)
    torch.testing.assert_close(layer.mixture_var, torch.full((1, 2), 9.0), atol=3.0, rtol=0)


def test_kmeans_plus_plus_survives_large_activations() -> None:
    points = torch.cat([torch.randn(100, 4) * 1e18, torch.randn(100, 4) * 1e18 + 1e20])
    centres = F.kmeans_plus_plus(points, 3, torch.Generator().manual_seed(0))
    assert torch.isfinite(centres).all() and centres.shape == (3, 4)


def test_mixnorm_names_divergence() -> None:
    with pytest.raises(FloatingPointError, match="diverged"):
        cn.MixtureNorm(C, K)(torch.full((4, C, 2, 2), float("nan")))


def test_mixnorm_normalises_each_component() -> None:
    torch.manual_seed(0)
    layer = cn.MixtureNorm(2, 2, affine=False, max_positions=4096, prior_scaling=True)
    points = torch.cat([torch.randn(300, 2) - 8, torch.randn(300, 2) * 2 + 8])
    y = layer(points)
    first, second = y[:300] * 0.5**0.5, y[300:] * 0.5**0.5  # undo 1/sqrt(lambda) with lambda = 1/2
    for part in (first, second):
        torch.testing.assert_close(part.mean(0), torch.zeros(2), atol=0.05, rtol=0)
        torch.testing.assert_close(part.std(0), torch.ones(2), atol=0.05, rtol=0)


# --- state, dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LAYERS)
def test_state_dict_round_trip(name: str) -> None:
    layer = make_layer(name)
    x, context = batch()
    for _ in range(2):
        call(layer, x, context)
    layer.eval()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_layer(name)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(buffer))
    fresh.eval()
    torch.testing.assert_close(call(fresh, x, context), call(layer, x, context))


@pytest.mark.parametrize("name", ["acn_gradient", "acn_momentum", "mixnorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixture_layers_under_autocast(name: str, dtype: torch.dtype) -> None:
    """The other layers are compared with float32 case by case in test_precision.py."""
    conv = nn.Conv2d(C, C, 1)
    layer = make_layer(name)
    x, context = batch(spatial=(4, 4))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.manual_seed(7)  # MixNorm draws its EM seeds: the same draws for both runs
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        y = call(layer, h, context)
    assert y.dtype == h.dtype
    assert torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all()
    layer.load_state_dict(state)
    torch.manual_seed(7)
    expected = call(layer, conv(x).detach(), context)
    torch.testing.assert_close(y.float(), expected, atol=0.15, rtol=0.05)


RESETTABLE = CONTEXT_LAYERS + ("modenorm", "switchnorm")


@pytest.mark.parametrize("name", RESETTABLE)
@pytest.mark.parametrize("training", [True, False])
def test_reset_running_stats_and_reset_parameters_mean_what_batchnorm_means(
    name: str, training: bool
) -> None:
    """reset_running_stats: running estimates only; reset_parameters: every learned value and them.

    Neither changes ``.training``. What "back to the start" means is read off a layer built
    the same way and never run.
    """
    x, context = batch()
    layer = make_layer(name)
    for _ in range(2):
        call(layer, x * 3 + 1, context)
    layer.train(training)
    parameters = {k: v.clone() for k, v in layer.named_parameters()}
    layer.reset_running_stats()
    assert layer.training is training
    for key, value in layer.named_parameters():
        assert torch.equal(value, parameters[key]), key
    torch.manual_seed(0)
    fresh = {
        "cn": lambda: cn.ContextNorm(C, K),
        "cnx": lambda: cn.ContextNormX(C, K),
        "cne": lambda: cn.ContextNormE(C, K),
        "cne_mlp": lambda: cn.ContextNormE(C, K, hidden_features=4),
        "modenorm": lambda: cn.ModeNorm(C, K),
        "switchnorm": lambda: cn.SwitchNorm(C),
    }[name]()
    for key, value in fresh.named_buffers():
        if key.startswith("running_") or key == "num_batches_tracked":
            assert torch.equal(dict(layer.named_buffers())[key], value), key
    layer.reset_parameters()
    assert layer.training is training
    for key, value in fresh.named_buffers():
        assert torch.equal(dict(layer.named_buffers())[key], value), key
    for key, value in fresh.named_parameters():
        # Encoders' hidden layers and ModeNorm's gate start at random, like nn.Linear's weights.
        random_start = key.startswith("gate.") or (
            key.endswith(".0.weight") or key.endswith(".0.bias")
        )
        if not random_start:
            assert torch.equal(dict(layer.named_parameters())[key], value), key
    assert str(C) in layer.extra_repr()


@pytest.mark.parametrize("name", ["cnx", "cne"])
def test_a_context_first_seen_in_a_second_forward_leaves_the_first_backward_intact(
    name: str,
) -> None:
    # AdaMatch's pattern: two forwards (source, then target) before one backward; the target's
    # context starts from its first batch in between, writing its row of the statistics.
    torch.manual_seed(0)
    layer = {"cnx": cn.ContextNormX, "cne": cn.ContextNormE}[name](C, 2).double().train()
    x = torch.randn(8, C, 3, dtype=torch.float64, requires_grad=True)
    first = call(layer, x[:4], torch.zeros(4, dtype=torch.long))
    second = call(layer, x[4:], torch.ones(4, dtype=torch.long))
    (first.square().sum() + second.square().sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad[:4].abs().sum() > 0
