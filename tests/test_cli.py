"""The ``contextnorm`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import contextnorm
from contextnorm.cli import main
from contextnorm.methods import METHODS

TINY_EXPERIMENT = """\
name: cli-tiny
data: {name: digits}
contexts: {kind: domain}
model: {name: shallow_cnn, options: {widths: [4, 8, 8, 8]}}
methods: [bn]
train: {epochs: 1, batch_size: 64, seeds: [0], accelerator: cpu, cpu_threads: 1}
plots: {samples: 32}
"""


def test_list_shows_methods_data_sets_models_and_configs(capsys) -> None:
    assert main(["list"]) == 0
    output = capsys.readouterr().out
    for name in METHODS:
        assert f"\n  {name} " in output
    for name in (
        "digits",
        "image-folder",
        "shallow_cnn",
        "densenet40",
        "vit",
        "superclass",
        "demo",
    ):
        assert name in output


def test_the_package_runs_as_a_program_and_knows_its_version() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "contextnorm", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == f"contextnorm {contextnorm.__version__}"


HEAVY_MODULES = ("torch", "lightning", "sklearn", "torchmetrics", "matplotlib")


@pytest.mark.parametrize(
    "arguments", [["--help"], ["run", "--help"], ["demo", "train.epoch=1"], ["demo", "train.lr=-1"]]
)
def test_help_and_config_mistakes_need_no_heavy_import(arguments) -> None:
    """The command answers at once: torch, Lightning and scikit-learn take seconds to import."""
    script = (
        "import sys\n"
        "from contextnorm.cli import main\n"
        "try:\n"
        f"    main({arguments!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('loaded:', sorted(set({HEAVY_MODULES!r}) & set(sys.modules)))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "loaded: []" in finished.stdout, finished.stdout + finished.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["run", "no-such-config.yaml"], "neither a YAML file nor a shipped config"),
        (["demo", "train.epoch=1"], "unknown config key 'train.epoch'"),
        (["demo", "epochs"], "must look like key.sub=value"),
        (["report", "."], "not a results folder"),
        (
            ["demo", "data.name=mnist", "data.root=/nonexistent/mnist"],
            "Or set data.root to the folder that holds the files, or data.download=true",
        ),
        (["demo", "contexts.kind=kmeans", "contexts.num_contexts=null"], "contexts.num_contexts"),
        (["demo", "contexts.kind=superclass"], "contexts.options.mapping"),
        (["demo", "task.name=gan"], "task.name: unknown task 'gan'; registered tasks:"),
    ],
)
def test_user_errors_exit_with_status_2_and_a_message(capsys, arguments, message) -> None:
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert message in error
    # Advice for the command line, not for the Python API.
    assert "load_dataset(" not in error and "pass " not in error


@pytest.mark.slow
def test_run_then_report_from_saved_results(tmp_path, capsys) -> None:
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TINY_EXPERIMENT, encoding="utf-8")
    results_dir = tmp_path / "results"
    assert main(["run", str(config_file), f"output_dir={results_dir}"]) == 0
    output = capsys.readouterr().out
    assert "[1/1] bn" in output
    assert "| method | seeds | accuracy, stored domain | Δ vs bn | s/epoch |" in output

    for name in ("results.md", "curves.png"):
        (results_dir / name).unlink()
    assert main(["report", str(results_dir)]) == 0
    assert "| bn | 1 |" in capsys.readouterr().out
    assert (results_dir / "results.md").stat().st_size > 0
    assert (results_dir / "curves.png").stat().st_size > 0
