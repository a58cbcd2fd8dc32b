"""The layer benchmark script: a quick run writes a complete table, and its loop reference is CN."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import contextnorm

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "layers.py"


@pytest.fixture(scope="module")
def layers_script():
    spec = importlib.util.spec_from_file_location("layers_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the class is created.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_targets_apply_to_the_context_layers_on_the_small_and_large_shapes(layers_script):
    """CN, CN-X and CN-E have a goal on both shapes, ACN (K = 3) on the large one only."""
    small = layers_script.build_configurations(
        16, 32, torch.device("cpu"), 0, layers_script.SMALL_SHAPE
    )
    targeted = {c.layer for c in small if c.target is not None}
    assert targeted == {"CN", "CN-X", "CN-E"}
    assert {c.target for c in small if c.layer == "CN"} == {1.5}
    large = layers_script.build_configurations(
        8, 4, torch.device("cpu"), 0, layers_script.LARGE_SHAPE
    )
    goals = {(c.layer, c.num_contexts): c.target for c in large if c.target is not None}
    assert goals[("ACN (momentum)", 3)] == goals[("ACN (gradient)", 3)] == 3.0
    assert ("ACN (momentum)", 8) not in goals
    assert {c.target for c in large if c.layer == "CN"} == {1.2}


def test_quick_run_writes_a_row_per_configuration(layers_script, tmp_path):
    # One thread: on a loaded machine, two threads make the many small operations crawl.
    threads = torch.get_num_threads()
    try:
        summaries = layers_script.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)

    batch, channels = layers_script.QUICK_SHAPE[:2]
    expected = {
        (c.layer, c.num_contexts)
        for c in layers_script.build_configurations(channels, batch, torch.device("cpu"), seed=0)
    }
    assert {(s.layer, s.num_contexts) for s in summaries} == expected
    with open(tmp_path / "layers_cpu_threads1.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["layer"], int(row["K"]) if row["K"] else None) for row in rows} == expected
    assert len(rows) == len(expected)
    reference = next(row for row in rows if row["layer"] == layers_script.REFERENCE)
    assert float(reference["ratio_median"]) == 1.0
    assert all(float(row["median_ms"]) > 0 for row in rows)
    assert all(row["met"] in ("yes", "no") for row in rows if row["target"])
    assert {row["shape"] for row in rows} == {"x".join(map(str, layers_script.QUICK_SHAPE))}

    table_rows = [
        line
        for line in (tmp_path / "layers_cpu_threads1.md").read_text().splitlines()
        if line.startswith("| ")
    ]
    assert len(table_rows) == len(expected) + 1  # the header row


def test_loop_reference_computes_context_norm(layers_script):
    torch.manual_seed(0)
    channels, num_contexts = 5, 4
    x = torch.randn(12, channels, 3, 3) * 2 + 1
    context = torch.tensor([0, 0, 1, 1, 1, 3, 3, 0, 1, 3, 3, 0])
    upstream = torch.randn_like(x)
    layers = [
        contextnorm.ContextNorm(channels, num_contexts, prior_scaling=True),
        layers_script.LoopContextNorm(channels, num_contexts, prior_scaling=True),
    ]
    with torch.no_grad():
        for layer in layers:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1.0, 1.0)
        layers[1].weight.copy_(layers[0].weight)
        layers[1].bias.copy_(layers[0].bias)

    outputs, input_grads = [], []
    for layer in layers:
        inputs = x.clone().requires_grad_()
        output = layer(inputs, context)
        output.backward(upstream)
        outputs.append(output)
        input_grads.append(inputs.grad)

    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(input_grads[1], input_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layers[1].running_mean, layers[0].running_mean)
    torch.testing.assert_close(layers[1].running_var, layers[0].running_var)


def test_malformed_shape_is_rejected_naming_the_expected_form(layers_script, capsys):
    with pytest.raises(SystemExit):
        layers_script.main(["--shape", "256,128"])
    assert "--shape must be four positive integers N,C,H,W" in capsys.readouterr().err


def test_training_step_quick_run_writes_a_row_per_model_and_norm(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "training_step_benchmark", SCRIPT.parent / "training_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        ratios = module.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert set(ratios) == {(model, method) for model in module.MODELS for method in module.METHODS}
    rows = [
        line
        for line in (tmp_path / "training_step_cpu_threads1.md").read_text().splitlines()
        if line.startswith("| ")
    ]
    assert len(rows) == len(ratios) + 1
