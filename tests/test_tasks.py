"""Tasks: the registry, options, and a task from outside the package run by the generic runner."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import contextnorm as cn
from contextnorm.cli import main
from contextnorm.config import ConfigError, TrainConfig
from contextnorm.runner import load_results, prepare_experiment, run_experiment
from contextnorm.tasks import TASKS, TaskModule, build_task
from contextnorm.tasks.classification import ClassificationTask

import regression_task
from regression_task import DigitRegression
from tiny import tiny_config


def tiny(tmp_path, *overrides: str):
    return tiny_config(
        tmp_path,
        "train.epochs=2",
        "train.seeds=[0, 1]",
        "plots.enabled=true",
        "plots.samples=32",
        *overrides,
    )


def test_a_config_without_a_task_is_classification(tmp_path) -> None:
    config = tiny(tmp_path)
    assert config.task.name == "classification"
    assert isinstance(build_task(config), ClassificationTask)
    assert "classification" in TASKS and "digit-regression" in TASKS


def test_an_unknown_task_names_the_registered_ones(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"task.name: unknown task 'regresion'.*classification"):
        build_task(tiny(tmp_path, "task.name=regresion"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{scael: 2}", r"unknown config key 'task.options.scael'; valid keys in .*: scale"),
        ("{scale: big}", r"task.options.scale must be a number; got 'big'"),
    ],
)
def test_task_options_are_checked_like_the_rest_of_the_config(tmp_path, options, message) -> None:
    config = tiny(tmp_path, "task.name=digit-regression", f"task.options={options}")
    with pytest.raises(ConfigError, match=message):
        run_experiment(config)
    assert not config.results_dir.exists()


def test_task_options_read_scientific_notation(tmp_path) -> None:
    task = build_task(tiny(tmp_path, "task.name=digit-regression", "task.options.scale=5e-1"))
    assert task.options == DigitRegression.Options(scale=0.5)


@pytest.mark.slow
def test_a_task_registered_outside_the_package_runs_end_to_end(tmp_path) -> None:
    config = tiny(tmp_path, "task.name=digit-regression", "task.options.scale=0.5")
    results_dir = run_experiment(config)

    results = load_results(results_dir)
    assert [spec.key for spec in results.spec.metrics] == ["mae", "mse"]
    for method in results.methods:
        assert len(method.finished()) == 2
        record = method.finished()[0]
        assert set(record.test) == {"test"} and record.test["test"]["mae"] >= 0
        assert [epoch["epoch"] for epoch in record.history] == [0, 1]
        # The task's selection metric picks the best epoch: the lowest validation error.
        errors = [epoch["val/mae"] for epoch in record.history]
        assert record.best == {
            "metric": "val/mae",
            "mode": "min",
            "value": min(errors),
            "epoch": errors.index(min(errors)) + 1,
        }
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert "## Test mean absolute error" in markdown
    assert "| cn | 2 |" in markdown and "Δ vs bn" in markdown
    for figure in ("curves.png", "test_mae.png", "activations.png", "features_pca.png"):
        assert (results_dir / figure).stat().st_size > 0, figure
    info = json.loads((results_dir / "experiment.json").read_text(encoding="utf-8"))
    assert info["task"] == "digit-regression"


def test_imports_register_a_users_task_before_the_experiment_is_built(
    tmp_path, monkeypatch
) -> None:
    module = tmp_path / "my_tasks.py"
    module.write_text(
        textwrap.dedent(
            """
            from regression_task import DigitRegression
            from contextnorm.tasks import TASKS

            @TASKS.register("my-regression")
            class MyRegression(DigitRegression):
                '''The regression task under another name.'''
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny(tmp_path, "task.name=my-regression", "imports=[my_tasks]")
    task = prepare_experiment(config)
    assert type(task).__name__ == "MyRegression"
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_module'"):
        prepare_experiment(tiny(tmp_path, "imports=[no_such_module]"))


def test_list_shows_the_tasks(capsys) -> None:
    assert main(["list"]) == 0
    output = capsys.readouterr().out
    assert "tasks (`task.name` in a config):" in output
    assert "  classification " in output
    assert "  digit-regression " in output and regression_task.DigitRegression.__doc__ in output


def test_a_module_keeps_no_context_apart_from_an_unknown_context() -> None:
    torch.manual_seed(0)
    layer = cn.ContextNorm(3, num_contexts=2)
    module = TaskModule(
        torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), layer), [layer], TrainConfig()
    )
    images = torch.randn(4, 1, 5, 5)
    module(images, torch.tensor([0, 1, 0, 1]))  # training statistics for both contexts
    module.eval()
    assert module.uses_context
    unknown = module(images, None)
    assert torch.equal(unknown, module(images, torch.full((4,), -1)))
    with pytest.raises(RuntimeError, match="ran without a context"):
        module(images)


def test_figures_group_an_ablation_by_the_experiments_contexts(tmp_path) -> None:
    ablation = "{name: cn, label: cn-single, contexts: {kind: random, num_contexts: 1}}"
    task = prepare_experiment(tiny_config(tmp_path, f"methods=[bn, {ablation}]"))
    probed = task.probe(1, task.build_module(1), 64, seed=0)
    # The samples ran with the single context 0; the figures draw them in their domains.
    assert set(probed.contexts.tolist()) == {0, 1}
