"""Every reduced replication with one command, and the page that sets it beside the papers.

The plan (``contextnorm/replications.yaml``, or a file of the same form) lists the replications:
a shipped config with overrides, the protocol its runs follow, and the published numbers each
is set beside, with the protocol those used and the test view here that corresponds to it.
:func:`run_replications` runs each into ``<results>/<name>`` (finished runs are kept, so an
interrupted job goes on where it stopped); :func:`render_page` writes the summary page from
the saved results alone.

Agreement with a published number is judged on the difference to the baseline, the only
quantity a reduced run can compare: the published difference (method minus baseline, one run
each) against the paired difference here with its 95 % t interval over seeds.

- **agrees**: the interval excludes 0, on the side of the published difference;
- **contradicts**: the interval excludes 0, on the other side;
- **not resolved**: the interval includes 0 (these runs support no difference either way).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from contextnorm.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    parse_section,
    read_yaml,
)
from contextnorm.metrics import Difference, MetricSpec
from contextnorm.runner.folder import ExperimentResults, MethodResults, load_results
from contextnorm.runner.report import difference

PLAN = "replications.yaml"
"""The shipped plan, next to the package's configs."""


@dataclass
class Published:
    """A column of published numbers.

    Attributes:
        source: the paper and table (``Faye et al. 2024b, Table I``).
        setting: data, length, runs (``CIFAR-10, 200 epochs, one run per method``).
        protocol: the contexts and placement the published numbers used, as far as stated.
        view: the test view here that corresponds to that protocol.
        values: method label -> the published number, in the units of the tables.
    """

    source: str
    setting: str
    protocol: str
    view: str
    values: dict[str, float]

    def check(self) -> None:
        for label, value in self.values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"published value of {label!r} in {self.source!r} must be a number; "
                    f"got {value!r}"
                )


@dataclass
class Replication:
    """One reduced replication: a config run into ``<results>/<name>``."""

    name: str
    title: str
    config: str
    protocol: str
    findings: str
    overrides: list[str] = field(default_factory=list)
    published: list[Published] = field(default_factory=list)

    def load(self, results_root: Path, reuse: str = "settings") -> ExperimentConfig:
        """The experiment config of this replication, writing into ``results_root/name``;
        ``reuse`` as the config's (``code``: runs made with other code are trained again)."""
        return load_config(
            self.config,
            [
                *self.overrides,
                f"name={self.name}",
                f"output_dir={results_root / self.name}",
                f"reuse={reuse}",
            ],
        )


@dataclass
class Plan:
    replications: list[Replication]

    def check(self) -> None:
        names = [entry.name for entry in self.replications]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"replication names must be unique; repeated: {repeated[0]!r}")
        for entry in self.replications:
            for column in entry.published:
                column.check()

    def select(self, names: Sequence[str]) -> list[Replication]:
        """The replications named (all when ``names`` is empty), in the plan's order."""
        known = {entry.name for entry in self.replications}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError(
                f"no replication named {unknown[0]!r}; the plan has: {', '.join(sorted(known))}"
            )
        return [entry for entry in self.replications if not names or entry.name in names]


def load_plan(path: str | Path | None = None) -> Plan:
    """The plan in ``path``, or the shipped one; every config is loaded once to check it."""
    if path is None:
        text = (resources.files("contextnorm") / PLAN).read_text(encoding="utf-8")
        where = PLAN
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    raw = read_yaml(text)
    plan = parse_section(Plan, raw, "")
    for entry in plan.replications:
        try:
            config = entry.load(Path("results"))
        except ConfigError as error:
            raise ConfigError(f"{where}: replication {entry.name!r}: {error}") from None
        labels = {method.display_name for method in config.methods}
        for column in entry.published:
            missing = sorted(set(column.values) - labels)
            if missing:
                raise ConfigError(
                    f"{where}: replication {entry.name!r} publishes {missing[0]!r}, which its "
                    f"config does not run; its methods: {', '.join(sorted(labels))}"
                )
    return plan


def run_replications(
    entries: Sequence[Replication],
    results_root: Path,
    echo: Callable[[str], None] = print,
    reuse: str = "settings",
) -> None:
    """Run each replication into ``results_root/<name>``; finished runs are kept (``reuse``:
    what they must match, as the config's ``reuse``)."""
    from contextnorm.runner.experiment import run_experiment

    for position, entry in enumerate(entries, start=1):
        echo(f"== replication {position} of {len(entries)}: {entry.name} ({entry.title})")
        run_experiment(entry.load(results_root, reuse), echo=echo)


def verdict(published: float, published_baseline: float, here: Difference) -> str:
    """How a published difference to the baseline compares with the paired one here."""
    if here.count < 2 or math.isnan(here.low):
        return "too few seeds"
    if not here.supported:
        return "not resolved"
    if (published - published_baseline) * here.mean > 0:
        return "agrees"
    return "contradicts"


def render_page(
    plan: Plan, results_root: Path, page: Path, command: str = "contextnorm replicate"
) -> str:
    """The summary page of every replication of ``plan``, from the results under ``results_root``.

    Links are relative to ``page``'s folder. A replication without results yet is listed as
    not run; a method of its config without finished runs shows as such.
    """
    link_base = Path(_relative(results_root, page.parent))
    sections = []
    overview = [
        "| replication | protocol here | published beside it | runs finished | results |",
        "|---|---|---|---|---|",
    ]
    for entry in plan.replications:
        folder = results_root / entry.name
        try:
            results = load_results(folder)
        except FileNotFoundError:
            results = None
        sources = "; ".join(column.source for column in entry.published) or "none"
        link = f"[{entry.name}]({link_base / entry.name / 'results.md'})" if results else "-"
        done = _progress(results, entry, results_root)
        overview.append(f"| {entry.title} | {entry.protocol} | {sources} | {done} | {link} |")
        sections.append(_section(entry, results, link_base / entry.name))
    return "\n".join(
        [
            "# Replications: the papers' experiments, reduced to two CPU cores",
            "",
            f"Written by `{command}` from the saved results under `{results_root}` and the",
            "published numbers of the plan (`src/contextnorm/replications.yaml`); what the",
            "results mean is discussed in [findings.md](findings.md). The papers are cited in",
            "full in [bibliography.md](bibliography.md).",
            "",
            "**Read these numbers for what they are.** The reduced runs train for a few epochs on",
            "a few thousand images (the papers: 100 to 200 epochs on 50,000 or more); absolute",
            "numbers are far from the papers' and only the comparison between methods says",
            "anything. Each cell is the mean ± sample standard deviation over the seeds; Δ is the",
            "difference to the baseline paired by seed with its 95 % Student's t interval",
            "(n - 1 degrees of freedom), `*` where the interval excludes 0: a difference these",
            "runs support. The papers report one run per method. Against each published",
            "difference to the baseline: **agrees** (the interval here excludes 0 on the same",
            "side), **contradicts** (it excludes 0 on the other side), **not resolved** (it",
            "includes 0). The context ablation rows: `-random` draws contexts at random with the",
            "same K and group sizes, fixed per sample; `-single` gives every sample one context",
            "(K = 1).",
            "",
            "Regenerate every replication and this page (finished runs are kept; the whole",
            "plan takes several hours on two CPU cores), or some of them, or the page alone:",
            "",
            "```bash",
            f"{command}",
            f"{command} shallow_cnn_em_reduced vit_superclass_reduced",
            f"{command} --page-only",
            "```",
            "",
            *overview,
            "",
            *sections,
        ]
    )


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


def _progress(results: ExperimentResults | None, entry: Replication, root: Path) -> str:
    if results is None:
        return "not run"
    expected = len(entry.load(root).methods) * len(results.config.train.seeds)
    done = sum(len(method.records) for method in results.methods)
    return f"{done} of {expected}"


def _section(entry: Replication, results: ExperimentResults | None, link: Path) -> str:
    lines = [f"## {entry.title}", "", f"Protocol here: {entry.protocol}."]
    for column in entry.published:
        lines.append(
            f"Published beside it: {column.source} ({column.setting}); its protocol: "
            f"{column.protocol}; compared in the view "
            f"**{_view_title(results, column.view)}**."
        )
    if not entry.published:
        lines.append("No published numbers to set beside these.")
    if results is None:
        lines += ["", f"Not run yet: `contextnorm replicate {entry.name}`.", ""]
        return "\n".join(lines)
    lines += ["", *[f"- {line}" for line in results.spec.about], ""]
    lines += [_table(entry, results), ""]
    # The report's figure of the headline metric (test_accuracy.png, test_fid.png, ...).
    name = f"test_{results.spec.headline.key}.png"
    figure = link / name
    if (results.results_dir / name).is_file():
        lines += [f"![{entry.name}: test metric by method]({figure})", ""]
    lines += [
        f"All metrics, curves and figures: [{entry.name}/results.md]({link / 'results.md'}). "
        f"Discussion: [findings](findings.md#{entry.findings}).",
        "",
    ]
    return "\n".join(lines)


def _view_title(results: ExperimentResults | None, view: str) -> str:
    if results is None or view not in results.spec.views:
        return view
    return results.spec.views[view].title


def _table(entry: Replication, results: ExperimentResults) -> str:
    spec: MetricSpec = results.spec.headline
    baseline = results.config.baseline
    unit = " (%)" if spec.percent else ""
    header = ["method", "seeds"]
    for view in results.views:
        header += [f"{spec.title}{unit}, {results.spec.views[view].title}", f"Δ vs {baseline}"]
    for column in entry.published:
        header += [f"published, {column.source}", "agreement"]
    rows = []
    for method in results.methods:
        row = [method.label, _seeds(method)]
        for view in results.views:
            if not method.finished():
                row += ["not run" if not method.records else "diverged", ""]
                continue
            found = difference(results, method, view, spec.key)
            row += [
                spec.format(method.summary(view, spec.key)),
                "baseline" if found is None else spec.format(found),
            ]
        for column in entry.published:
            row += _published_cells(column, method, results, spec)
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _seeds(method: MethodResults) -> str:
    done, diverged = len(method.finished()), len(method.diverged())
    return f"{done} of {done + diverged} ({diverged} diverged)" if diverged else str(done)


def _published_cells(
    column: Published, method: MethodResults, results: ExperimentResults, spec: MetricSpec
) -> list[str]:
    value = column.values.get(method.label)
    if value is None:
        return ["-", ""]
    reference = column.values.get(results.config.baseline)
    if method.label == results.config.baseline or reference is None:
        return [f"{value:g}", ""]
    cell = f"{value:g} ({value - reference:+.2f})"
    if not method.finished():
        return [cell, "diverged here" if method.records else "not run here"]
    here = difference(results, method, column.view, spec.key)
    if here is None:
        return [cell, "not run here"]
    return [cell, verdict(value, reference, here)]
