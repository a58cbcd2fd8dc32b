"""The replications plan, `contextnorm replicate`, and the page it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from contextnorm.cli import main
from contextnorm.config import ConfigError
from contextnorm.io import atomic_write_json
from contextnorm.metrics import Difference
from contextnorm.runner.fingerprint import code_version
from contextnorm.runner.folder import load_results
from contextnorm.runner.replications import load_plan, verdict
from contextnorm.runner.report import difference

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = (
    '["train.epochs=1", "train.seeds=[0, 1]", "plots.enabled=false", "train.progress=none", '
    '"methods=[bn, cn, {name: cn, label: cn-single, contexts: {kind: random, num_contexts: 1}}]"]'
)


def write_plan(folder: Path, published: str, name: str = "tiny") -> Path:
    path = folder / "plan.yaml"
    path.write_text(
        f"""replications:
  - name: {name}
    title: Tiny digits
    config: demo
    overrides: {TINY}
    protocol: the visual domain as context
    findings: tiny
    published:
{published}
  - name: never
    title: Never run
    config: demo
    protocol: none
    findings: never
""",
        encoding="utf-8",
    )
    return path


PUBLISHED = """      - source: Somebody 2030, Table 1
        setting: digits, one run
        protocol: the true domain
        view: input
        values: {bn: 90.0, cn: 95.0}
"""


def test_shipped_plan_loads_and_names_only_methods_its_configs_run() -> None:
    plan = load_plan()
    names = [entry.name for entry in plan.replications]
    assert "demo" in names and "densenet40_kmeans_reduced_input" in names
    for entry in plan.replications:
        assert entry.findings
        for column in entry.published:
            assert column.values


def test_a_published_method_the_config_does_not_run_is_refused(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, PUBLISHED.replace("cn: 95.0", "acn: 95.0"))
    with pytest.raises(ConfigError, match=r"publishes 'acn', which its config does not run"):
        load_plan(plan)


def test_a_non_numeric_published_value_is_refused(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, PUBLISHED.replace("cn: 95.0", "cn: high"))
    with pytest.raises(ConfigError, match="published value of 'cn'.*must be a number"):
        load_plan(plan)


def test_unknown_replication_name_lists_the_plan(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path, PUBLISHED))
    with pytest.raises(ConfigError, match="no replication named 'tinny'; the plan has: never"):
        plan.select(["tinny"])


@pytest.mark.parametrize(
    ("published", "here", "expected"),
    [
        (95.0, Difference(0.02, 0.01, 0.03, 3), "agrees"),
        (85.0, Difference(0.02, 0.01, 0.03, 3), "contradicts"),
        (85.0, Difference(-0.02, -0.03, -0.01, 3), "agrees"),
        (95.0, Difference(0.02, -0.01, 0.05, 3), "not resolved"),
        (95.0, Difference(0.02, math.nan, math.nan, 1), "too few seeds"),
    ],
)
def test_verdict_compares_the_sides_of_zero(
    published: float, here: Difference, expected: str
) -> None:
    assert verdict(published, 90.0, here) == expected


def test_replicate_runs_the_plan_and_writes_the_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path, PUBLISHED)
    results, page = tmp_path / "results", tmp_path / "docs" / "replications.md"
    arguments = ["--plan", str(plan), "--results", str(results), "--page", str(page)]
    assert main(["replicate", "tiny", *arguments]) == 0
    saved = load_results(results / "tiny")
    assert [method.label for method in saved.methods] == ["bn", "cn", "cn-single"]
    assert all(len(method.finished()) == 2 for method in saved.methods)

    text = page.read_text(encoding="utf-8")
    assert "Somebody 2030, Table 1" in text and "Never run" in text
    assert "Not run yet: `contextnorm replicate never`." in text
    assert "](../results/tiny/results.md)" in text
    row = next(line for line in text.splitlines() if line.startswith("| cn |"))
    # The published difference (+5.00) and the verdict of the paired difference here.
    assert "95 (+5.00)" in row
    expected = verdict(95.0, 90.0, difference(saved, saved.methods[1], "input", "accuracy"))
    assert row.endswith(f"| {expected} |")
    single = next(line for line in text.splitlines() if line.startswith("| cn-single |"))
    assert single.endswith("| - |  |")

    # The page alone: nothing is trained again, the page is the same.
    page.unlink()
    assert main(["replicate", "--page-only", *arguments]) == 0
    assert page.read_text(encoding="utf-8") == text

    # --reuse code: a run made with other code is set aside and trained again.
    run_dir = results / "tiny" / "runs" / "bn" / "seed-0"
    stored = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    atomic_write_json(run_dir / "result.json", {**stored, "code": "0.0.9+earlier"})
    assert main(["replicate", "tiny", "--reuse", "code", *arguments]) == 0
    assert (results / "tiny" / "stale" / "0.0.9+earlier" / "bn" / "seed-0").is_dir()
    renewed = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    assert renewed["code"] == code_version()
