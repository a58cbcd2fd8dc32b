"""Compiled, exported and ONNX graphs compute what eager mode computes.

Compiled tests use the ``aot_eager`` backend: it captures the whole forward and backward
graph as ``inductor`` does (so a graph break or a host read fails them) without the minutes
of code generation; ``benchmarks/layers.py --compile`` times the inductor path.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import contextnorm as cn
from helpers import layer_factories, one_thread

K = 3
C = 4
CONTEXT_LAYERS = {
    name: build for name, build in layer_factories(C, K).items() if name in ("cn", "cnx", "cne")
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batches(name: str, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches; CN-X and CN-E get unknown ids too (their training handles them)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        x = torch.randn(6, C, 3, 3, generator=generator) * (step + 1) + step
        context = (
            torch.tensor([0, 1, 2, 0, 1, 2]) if name == "cn" else torch.tensor([0, 1, -1, 2, -1, 1])
        )
        out.append((x, context))
    return out


# Compiled graphs compute the per-sample moments with a Welford reduction, eager mode with
# BatchNorm's two-pass kernel: equal up to float32 rounding.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def assert_same_state(got: nn.Module, expected: nn.Module) -> None:
    for (key, value), (_, reference) in zip(
        got.state_dict().items(), expected.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(value, reference, msg=key, **TOLERANCE)
    for (key, value), (_, reference) in zip(
        got.named_parameters(), expected.named_parameters(), strict=True
    ):
        torch.testing.assert_close(
            value.grad, reference.grad, msg=f"gradient of {key}", **TOLERANCE
        )


@pytest.mark.parametrize("name", CONTEXT_LAYERS)
def test_compiled_training_with_explicit_contexts_equals_eager(name: str) -> None:
    torch.manual_seed(0)
    eager = CONTEXT_LAYERS[name](validate_context=False)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for x, context in batches(name):
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager, y_compiled = eager(x_eager, context), compiled(x_compiled, context)
        torch.testing.assert_close(y_compiled, y_eager, **TOLERANCE)
        upstream = torch.randn_like(x)
        y_eager.backward(upstream)
        y_compiled.backward(upstream)
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, **TOLERANCE)
    assert_same_state(compiled_layer, eager)


def tiny_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        nn.BatchNorm2d(C),
        nn.ReLU(),
        nn.Conv2d(C, C, 1),
        nn.BatchNorm2d(C),
    )


@pytest.mark.parametrize("layer", [cn.ContextNorm, cn.ContextNormX, cn.ContextNormE])
def test_compiled_converted_model_trains_like_eager(layer: type[nn.Module]) -> None:
    eager = cn.ContextualModel(cn.convert(tiny_network(), layer, K), validate=False)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(6, 3, 5, 5, generator=generator)
        context = torch.tensor([0, 1, 2, 2, 1, 0])
        losses = []
        for model, optimizer in zip((eager, compiled), optimizers, strict=True):
            optimizer.zero_grad()
            loss = model(x, context).square().mean()
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], **TOLERANCE)
        assert_same_state(compiled_model, eager)
        for optimizer in optimizers:
            optimizer.step()


def graph_breaks(module: nn.Module, *args: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(module)(*args).graph_break_count


def break_reasons(module: nn.Module, *args: torch.Tensor) -> set[str]:
    torch._dynamo.reset()
    return {str(reason.reason) for reason in torch._dynamo.explain(module)(*args).break_reasons}


def test_graph_breaks_in_training_match_batchnorm() -> None:
    """BatchNorm compiles to one graph in training; so does every layer, once contexts are not
    checked inside the graph. A checked explicit context breaks the graph for its check only."""
    x = torch.randn(6, C, 3, 3)
    context = torch.tensor([0, 1, 2, 0, 1, 2])
    counts = {"BatchNorm2d": graph_breaks(nn.BatchNorm2d(C), x)}
    reasons = set()
    for name, build in CONTEXT_LAYERS.items():
        counts[name] = graph_breaks(build(validate_context=False), x, context)
        reasons |= break_reasons(build(), x, context)
    counts["modenorm"] = graph_breaks(cn.ModeNorm(C, K), x)
    counts["switchnorm"] = graph_breaks(cn.SwitchNorm(C), x)
    counts["converted model"] = graph_breaks(
        cn.ContextualModel(cn.convert(tiny_network(), cn.ContextNormX, K), validate=False),
        torch.randn(6, 3, 5, 5),
        context,
    )
    assert all(value == 0 for value in counts.values()), counts
    assert len(reasons) == 1 and "_check_context" in reasons.pop()


class _WithContext(nn.Module):
    """A layer as a module taking (x, context), the form the exporters trace."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.layer(x, context)


def trained_eval_layer(name: str, **options: object) -> nn.Module:
    torch.manual_seed(0)
    layer = CONTEXT_LAYERS[name](**options)
    for x, _ in batches(name, 2):
        layer(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    return _WithContext(layer).eval()


EXPORT_INPUTS = (
    torch.randn(6, C, 3, 3, generator=torch.Generator().manual_seed(2)),
    torch.tensor([0, 1, 2, 2, 1, 0]),
)
TEST_CONTEXTS = (
    torch.tensor([0, 1, 2, 2, 1, 0]),
    torch.tensor([-1, 1, -1, 2, 0, -1]),
    torch.full((6,), -1),
)


@pytest.mark.parametrize("name", CONTEXT_LAYERS)
def test_exported_eval_graph_handles_known_and_unknown_ids_as_eager(name: str) -> None:
    model = trained_eval_layer(name, validate_context=False)
    exported = torch.export.export(model, EXPORT_INPUTS).module()
    x = EXPORT_INPUTS[0]
    for context in TEST_CONTEXTS:
        torch.testing.assert_close(exported(x, context), model(x, context))


@pytest.mark.parametrize("name", CONTEXT_LAYERS)
def test_export_with_checks_on_refuses_naming_the_switch(name: str) -> None:
    model = trained_eval_layer(name)
    with pytest.raises(RuntimeError, match="validate_context=False"):
        torch.export.export(model, EXPORT_INPUTS)
    with pytest.raises(RuntimeError, match="validate_context=False"):
        torch.jit.trace(model, EXPORT_INPUTS)


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None
    or importlib.util.find_spec("onnxscript") is None,
    reason="onnxruntime and onnxscript are not installed (pip install -e '.[test]')",
)
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
@pytest.mark.parametrize("name", CONTEXT_LAYERS)
def test_onnx_graph_handles_known_and_unknown_ids_as_eager(
    name: str, dynamo: bool, tmp_path
) -> None:
    import onnxruntime

    model = trained_eval_layer(name, validate_context=False)
    path = tmp_path / "layer.onnx"
    torch.onnx.export(model, EXPORT_INPUTS, str(path), dynamo=dynamo, input_names=["x", "context"])
    model.eval()  # the TorchScript exporter restores the wrapper's training flag on every submodule
    session = onnxruntime.InferenceSession(str(path))
    x = EXPORT_INPUTS[0]
    for context in TEST_CONTEXTS:
        (got,) = session.run(None, {"x": x.numpy(), "context": context.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x, context), atol=1e-5, rtol=1e-5)
