"""The ``contextnorm`` command: run experiments, the demo, list what exists, rebuild reports.

::

    contextnorm run CONFIG [key=value ...]   run an experiment (YAML file or shipped config name)
    contextnorm demo [key=value ...]         the demo: seven normalizations on two-domain digits
    contextnorm list                         tasks, methods, data sets, models, contexts, configs
    contextnorm report RESULTS_DIR           rewrite tables and figures from saved results
    contextnorm replicate [NAME ...]         run the reduced replications, write their page
    contextnorm cache [--clear]              the decoded-image cache: where, how big; empty it

Exit status: 0 on success, 2 for a mistake in the command or config (the message names the key
to change), 130 when interrupted with Ctrl-C (the message says what is saved and how to go on).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import resources

from contextnorm import __version__
from contextnorm.config import REUSE_POLICIES, ConfigError, load_config, shipped_configs

DEMO_CONFIG = "demo"
INTERRUPTED = 130
USAGE_ERROR = 2
# Each command imports what it needs itself: Lightning and scikit-learn take seconds to import,
# and `--help`, `--version` or a mistake in a config do not need them.


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``contextnorm`` command; returns the exit status."""
    arguments_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    arguments = parser.parse_args(arguments_list)
    try:
        return arguments.handler(arguments)
    except (ConfigError, FileNotFoundError) as error:
        print(f"contextnorm: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt as interrupt:
        print(_interrupted(interrupt, arguments_list), file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`contextnorm list | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contextnorm",
        description="Context-based normalization experiments: train and compare normalization "
        "layers from YAML configs, with tables and figures of the results.",
        epilog="Start with `contextnorm demo`; `contextnorm list` shows what a config can name.",
    )
    parser.add_argument("--version", action="version", version=f"contextnorm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides_help = "config overrides such as train.epochs=5 or methods=[bn,cn] (values are YAML)"

    run = commands.add_parser("run", help="run an experiment from a config")
    run.add_argument(
        "config", help="a YAML file or the name of a shipped config (see `contextnorm list`)"
    )
    run.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo", help="the demo: 7 normalizations on two-domain digits, 3 seeds (CPU, ~2 min)"
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    demo.set_defaults(handler=_run, config=DEMO_CONFIG)

    listing = commands.add_parser(
        "list", help="list tasks, methods, data sets, models, context kinds and shipped configs"
    )
    listing.set_defaults(handler=_list)

    report = commands.add_parser(
        "report", help="rewrite results.md, results.csv and figures from saved results"
    )
    report.add_argument("results_dir", help="the output folder of an experiment")
    report.add_argument(
        "--measure-layers",
        action="store_true",
        help="first measure the train/eval gap and final mixtures of finished runs that have "
        "none (runs of an earlier version), from their checkpoints",
    )
    report.set_defaults(handler=_report)

    replicate = commands.add_parser(
        "replicate",
        help="run every reduced replication of the papers (or those named) and write the page "
        "that sets them beside the published numbers",
    )
    replicate.add_argument(
        "names", nargs="*", metavar="NAME", help="replications to run (default: all of the plan)"
    )
    replicate.add_argument(
        "--results", default="results", help="folder of the results folders (default: results)"
    )
    replicate.add_argument(
        "--page",
        default="docs/replications.md",
        help="the page to write (default: docs/replications.md)",
    )
    replicate.add_argument(
        "--page-only", action="store_true", help="write the page from saved results; run nothing"
    )
    replicate.add_argument(
        "--plan", default=None, help="a plan file of the shipped plan's form (default: shipped)"
    )
    replicate.add_argument(
        "--reuse",
        choices=REUSE_POLICIES,
        default="settings",
        help="what a saved run must match to be kept: its settings (default), or its settings "
        "and code version (runs made with other code are set aside and trained again)",
    )
    replicate.set_defaults(handler=_replicate)

    cache = commands.add_parser(
        "cache",
        help="the decoded-image cache: where it is, its size and limit ($CONTEXTNORM_CACHE_GB)",
    )
    cache.add_argument("--clear", action="store_true", help="delete every cached file")
    cache.set_defaults(handler=_cache)
    return parser


def _run(arguments: argparse.Namespace) -> int:
    config = load_config(arguments.config, arguments.overrides)
    from contextnorm.runner import headline_table, is_main_process, load_results, run_experiment

    start = time.perf_counter()
    results_dir = run_experiment(config, echo=lambda line: print(line, flush=True))
    if not is_main_process():
        # The other processes of a multi-device run: the first one reports.
        return 0
    print()
    print(headline_table(load_results(results_dir)))
    print(
        f"\nFinished in {time.perf_counter() - start:.0f} s. "
        f"Results, tables and figures: {results_dir}"
    )
    return 0


def _report(arguments: argparse.Namespace) -> int:
    from contextnorm.runner import headline_table, load_results, write_report

    if arguments.measure_layers:
        from pathlib import Path

        from contextnorm.runner.diagnostics import measure_saved_runs

        load_results(arguments.results_dir)  # a clear error for a folder that is not results
        measured = measure_saved_runs(Path(arguments.results_dir))
        print(f"Measured the norm layers of {measured} saved runs.")

    markdown = write_report(arguments.results_dir)
    print(headline_table(load_results(arguments.results_dir)))
    print(f"\nWrote {markdown} and the figures next to it.")
    return 0


def _replicate(arguments: argparse.Namespace) -> int:
    from pathlib import Path

    from contextnorm.io import atomic_write_text
    from contextnorm.runner.replications import load_plan, render_page, run_replications

    plan = load_plan(arguments.plan)
    entries = plan.select(arguments.names)
    results_root = Path(arguments.results)
    if not arguments.page_only:
        run_replications(
            entries,
            results_root,
            echo=lambda line: print(line, flush=True),
            reuse=arguments.reuse,
        )
    page = Path(arguments.page)
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page, render_page(plan, results_root, page))
    print(f"Wrote {page}.")
    return 0


def _list(arguments: argparse.Namespace) -> int:
    from contextnorm.contexts import CONTEXTS
    from contextnorm.data import DATASETS
    from contextnorm.methods import METHODS
    from contextnorm.models import GENERATORS, MODELS
    from contextnorm.tasks import TASKS

    for registry, where in (
        (TASKS, "`task.name` in a config"),
        (METHODS, "`methods` in a config"),
        (DATASETS, "`data.name` in a config"),
        (MODELS, "`model.name` in a config"),
        (GENERATORS, "`model.name` in a generation config"),
        (CONTEXTS, "`contexts.kind` in a config"),
    ):
        print(f"{registry.plural} ({where}):")
        for name in registry:
            print(f"  {name:<16} {registry.summary(name)}")
        print()
    print("shipped configs (`contextnorm run NAME`):")
    for name in shipped_configs():
        print(f"  {name:<28} {_first_comment(name)}")
    return 0


def _cache(arguments: argparse.Namespace) -> int:
    from contextnorm.data.decode import cache_entries, cache_folder, cache_limit_bytes, clear_cache

    entries = clear_cache() if arguments.clear else cache_entries()
    size = sum(entry.size for entry in entries) / 1024**3
    action = "deleted" if arguments.clear else "holds"
    print(f"decoded-image cache: {cache_folder()}")
    limit = cache_limit_bytes() / 1024**3
    print(f"{action} {len(entries)} file(s), {size:.2f} GB; limit {limit:g} GB")
    return 0


def _first_comment(name: str) -> str:
    text = (resources.files("contextnorm") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _interrupted(interrupt: KeyboardInterrupt, argv: Sequence[str]) -> str:
    """What Ctrl-C left behind, and the command that goes on from there."""
    lines = ["", "Interrupted."]
    results_dir = getattr(interrupt, "results_dir", None)
    if results_dir is not None:
        lines.append(
            f"Saved in {results_dir}: {interrupt.finished} of {interrupt.total} runs finished "
            "(their results, tables and checkpoints)."
        )
        run_dir = getattr(interrupt, "run_dir", None)
        if run_dir is not None:
            epochs = interrupt.epochs_saved
            lines.append(
                f"The run in {run_dir} was training: its checkpoint after epoch {epochs} is kept."
                if epochs
                else f"The run in {run_dir} was in its first epoch: it starts over."
            )
    lines.append(f"Resume with: {shlex.join(['contextnorm', *argv])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
