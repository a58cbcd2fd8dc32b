"""The ``contextnorm`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
    header = "| method | seeds | accuracy, stored domain | Δ vs bn | train/eval gap, median (max) |"
    assert header + " s/epoch |" in output

    for name in ("results.md", "curves.png"):
        (results_dir / name).unlink()
    assert main(["report", str(results_dir)]) == 0
    assert "| bn | 1 |" in capsys.readouterr().out
    assert (results_dir / "results.md").stat().st_size > 0
    assert (results_dir / "curves.png").stat().st_size > 0


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(first_line: str) -> str:
    """The README's code block that starts with ``first_line``: tests keep the README true."""
    text = README.read_text(encoding="utf-8")
    start = text.index(first_line)
    return text[start : text.index("```", start)]


@pytest.mark.slow
def test_the_readme_walkthrough_from_images_and_a_spreadsheet_to_a_table(
    tmp_path, monkeypatch, capsys
) -> None:
    rng = np.random.default_rng(0)
    rows = ["path,domain"]
    for split, count in (("train", 24), ("test", 8)):
        for label, name in enumerate(("benign", "malignant")):
            for index in range(count):
                scanner = ("scanner-a", "scanner-b")[index % 2]
                # Two scanners: a bright and a dark rendering of the same kind of pattern.
                pixels = rng.integers(0, 60, (8, 8)) + 40 * label
                pixels = pixels + 150 if scanner == "scanner-a" else pixels
                path = Path("my-images") / split / name / f"{index:04d}.png"
                path_on_disk = tmp_path / path
                path_on_disk.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path_on_disk)
                rows.append(f"{path.relative_to('my-images').as_posix()},{scanner}")
    (tmp_path / "my-images" / "domains.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "my-images.yaml").write_text(readme_block("# my-images.yaml"))
    monkeypatch.chdir(tmp_path)

    quick = [
        "train.epochs=1",
        "train.seeds=[0]",
        "train.batch_size=16",
        "train.cpu_threads=1",
        "model.options.widths=[4, 8, 8, 8]",
        "plots.enabled=false",
    ]
    assert main(["run", "my-images.yaml", *quick]) == 0
    output = capsys.readouterr().out
    header = "| method | seeds | accuracy, stored domain | Δ vs bn | train/eval gap, median (max) |"
    assert header + " s/epoch |" in output
    for label in ("bn", "cn", "cnx", "cne", "cn-random"):
        assert f"| {label} | 1 |" in output
    results = Path("runs/my-images/results.md").read_text(encoding="utf-8")
    assert "contexts: domain, K = 2 (scanner-a, scanner-b)" in results


def test_a_results_folder_of_an_earlier_version_says_how_to_regenerate_it(tmp_path, capsys) -> None:
    (tmp_path / "config.yaml").write_text("name: old\nmethods: [bn]\n")
    (tmp_path / "experiment.json").write_text('{"views": {"input": "context from input"}}')
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "written by an earlier version of contextnorm" in error
    assert f"contextnorm run {tmp_path / 'config.yaml'} output_dir=" in error
