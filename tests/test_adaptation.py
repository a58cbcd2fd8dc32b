"""The domain-adaptation task: its config checks, its contexts and views, and a run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from contextnorm.cli import main
from contextnorm.config import ConfigError
from contextnorm.runner import load_results, prepare_experiment, run_experiment
from contextnorm.tasks import TASKS, build_task
from contextnorm.tasks.adaptation import VIEWS, AdaptationTask

from tiny import tiny_adaptation_config

pytestmark = pytest.mark.usefixtures("private_data_root")


def prepared(tmp_path, *overrides: str) -> AdaptationTask:
    task = build_task(tiny_adaptation_config(tmp_path, *overrides))
    assert isinstance(task, AdaptationTask)
    task.setup()
    return task


def test_the_task_is_registered_and_listed(capsys) -> None:
    assert TASKS.get("adaptation") is AdaptationTask
    assert main(["list"]) == 0
    output = capsys.readouterr().out
    assert "  adaptation " in output and "  wide_resnet " in output and "  mnist-m-style " in output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.options={}"], r"task.options.target is required: domain adaptation needs"),
        (["task.options.tau=1.5"], r"task.options.tau must be in \[0, 1\]; got 1.5"),
        (["task.options.uratio=0"], r"task.options.uratio must be a positive integer"),
        (
            ["task.options.target.val_fraction=1.5"],
            r"task.options.target.val_fraction must be in \[0, 1\)",
        ),
        (["task.options.taget={name: svhn}"], r"unknown config key 'task.options.taget'"),
    ],
)
def test_bad_task_options_fail_before_any_data_is_read(tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_task(tiny_adaptation_config(tmp_path, *overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["contexts.kind=kmeans"], r"contexts.kind must be domain for domain adaptation"),
        (["contexts.num_contexts=3"], r"contexts.num_contexts must be 2 \(source and target\)"),
        (
            ["methods=[{name: cn, options: {num_contexts: 3}}]"],
            r"methods\[0\] \(cn\): num_contexts=3 disagrees with contexts.num_contexts=2",
        ),
        (
            ["methods=[bn, {name: cn, contexts: {kind: kmeans, num_contexts: 2}}]"],
            r"methods\[1\].contexts.kind: domain adaptation takes",
        ),
        (["task.options.source_only=[bn-alone]"], r"task.options.source_only names \['bn-alone'\]"),
        (["task.options.gradient_variance=[cnx]"], r"task.options.gradient_variance names"),
        (["data.augment=crop_flip"], r"data.augment=crop_flip does not apply"),
        (["train.batch_size=5000"], r"train.batch_size=5000 source images per step.*has 86"),
        (
            ["task.options.target.image_size=16"],
            r"one shape.*data: 3x8x8 and task.options.target: 3x16x16",
        ),
        (
            ["task.options.target={name: digits, options: {domain: sideways}}"],
            r"task.options.target \(digits\): domain must be one of original, inverted",
        ),
        (["task.options.target={name: svhn}"], r"task.options.target.root to the folder"),
    ],
)
def test_bad_setups_are_config_errors_naming_the_key(tmp_path, overrides, message) -> None:
    config = tiny_adaptation_config(tmp_path, *overrides)
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        prepare_experiment(config)
    assert not config.results_dir.exists()


def test_domains_are_the_contexts_and_the_target_is_tested_in_three_views(tmp_path) -> None:
    task = prepared(tmp_path)
    (contexts, _), domains = task.contexts, task.domains
    train = contexts.train
    assert torch.equal(train.contexts, train.data.domains)
    n_source = len(domains.source.train)
    assert (train.contexts[:n_source] == 0).all() and (train.contexts[n_source:] == 1).all()
    assert list(contexts.test) == list(VIEWS)
    expected = {"source": 0, "target": 1, "target_as_source": 0, "target_unknown": -1}
    for view, context in expected.items():
        assert (contexts.test[view].contexts == context).all(), view
    assert torch.equal(contexts.test["target"].data.images, domains.target.test.images)
    assert (contexts.val.contexts == 0).all() and (contexts.val_target.contexts == 1).all()


def test_ablation_contexts_keep_the_domain_sizes_and_drop_their_information(tmp_path) -> None:
    task = prepared(
        tmp_path,
        "methods=[cn, {name: cn, label: cn-random, contexts: {kind: random}},"
        " {name: cn, label: cn-single, contexts: {kind: random, num_contexts: 1}}]",
    )
    domain, random, single = task.contexts
    assert (random.num_contexts, single.num_contexts) == (2, 1)
    # Random: the domains' group sizes over both domains together, unrelated to the domain.
    counts = torch.bincount(random.train.contexts, minlength=2)
    assert torch.equal(counts, torch.bincount(domain.train.contexts, minlength=2))
    agreement = (random.train.contexts == domain.train.contexts).double().mean()
    assert 0.35 < agreement < 0.65
    assert set(random.test["target"].contexts.tolist()) == {0, 1}
    assert (single.train.contexts == 0).all() and (single.test["target"].contexts == 0).all()
    # Every method tests the same images.
    for view in VIEWS:
        assert torch.equal(random.test[view].data.images, domain.test[view].data.images)
    # The modules get one context slot per context.
    module = task.build_module(2)
    assert module.tested_layers[0].num_contexts == 1
    note = " ".join(task.describe().notes)
    assert "cn-random: random, K = 2" in note and "cn-single: random, K = 1" in note


def test_a_model_without_context_layers_is_tested_once_per_domain(tmp_path) -> None:
    task = prepared(tmp_path, "methods=[bn, cn]")
    assert task.build_module(0).test_views == ["source", "target"]
    assert task.build_module(1).test_views == list(VIEWS)


@pytest.mark.slow
def test_a_run_end_to_end_reports_every_view_and_the_gradient_variance(tmp_path) -> None:
    config = tiny_adaptation_config(
        tmp_path,
        "model.placement=input",
        "methods=[{name: bn, label: bn-source-only}, bn, cn]",
        "task.options.source_only=[bn-source-only]",
        "task.options.gradient_variance=[bn-source-only, cn]",
        "train.epochs=2",
        "train.seeds=[0, 1]",
        "plots.enabled=true",
        "plots.samples=32",
    )
    results_dir = run_experiment(config)
    results = load_results(results_dir)
    assert results.views == list(VIEWS)
    source_only, adamatch, context = results.methods
    for method in results.methods:
        assert len(method.finished()) == 2
    record = context.finished()[0]
    assert set(record.test) == set(VIEWS)
    # The norms' train/eval gap on a step's worth (two views of 8 source and 16 target images)
    # of validation images, here all of them: 10 % of 96 source and of 200 target images.
    assert record.train_eval_gap["samples"] == min(2 * 8, 10) + min(2 * 16, 20)
    assert record.train_eval_gap["max"] >= record.train_eval_gap["median"] > 0
    metrics = record.test["target"]
    assert {"accuracy", "precision", "recall", "f1", "weighted_precision", "weighted_f1"} <= set(
        metrics
    )
    # Without context layers, the target views are one measurement.
    plain = adamatch.finished()[0].test
    assert plain["target"] == plain["target_as_source"] == plain["target_unknown"]
    # The source's validation loss selects; the target's curves are recorded, never selecting.
    assert record.best["metric"] == "val/loss"
    assert all("val/target/accuracy" in epoch for epoch in record.history)
    # The gradient variance: both domains for AdaMatch, the source alone for source-only, and
    # nothing where it was not asked for.
    assert {"grad_variance/source/max", "grad_variance/target/mean"} <= set(record.history[1])
    assert "grad_variance/source/mean" in source_only.finished()[0].history[1]
    assert "grad_variance/target/mean" not in source_only.finished()[0].history[1]
    assert not any(key.startswith("grad_variance") for key in adamatch.finished()[0].history[1])
    for figure in ("curves.png", "gradient_variance.png", "test_accuracy.png", "activations.png"):
        assert (results_dir / figure).stat().st_size > 0, figure
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert "target: two-domain digits (inverted), source domain id" in markdown
    assert "average='weighted'" in markdown and "source only: bn-source-only" in markdown
    info = json.loads((results_dir / "experiment.json").read_text(encoding="utf-8"))
    assert info["task"] == "adaptation" and info["source_only"] == ["bn-source-only"]
    assert "gradient_variance" in info["report"]["curve_figures"]
