"""The ``contextnorm`` command: run experiments, the demo, list what exists, rebuild reports.

::

    contextnorm run CONFIG [key=value ...]   run an experiment (YAML file or shipped config name)
    contextnorm demo [key=value ...]         the demo: seven normalizations on two-domain digits
    contextnorm list                         methods, data sets, models, contexts, shipped configs
    contextnorm report RESULTS_DIR           rewrite tables and figures from saved results
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib import resources

from contextnorm.config import ConfigError, load_config, shipped_configs

DEMO_CONFIG = "demo"
# The command handlers import the experiment toolkit themselves: Lightning takes seconds to
# import, and `--help` or `list` do not need it.


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``contextnorm`` command; returns the exit status."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.handler(arguments)
    except (ConfigError, FileNotFoundError) as error:
        print(f"contextnorm: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contextnorm", description="Context-based normalization experiments."
    )
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
        "list", help="list methods, data sets, models, context kinds and shipped configs"
    )
    listing.set_defaults(handler=_list)

    report = commands.add_parser(
        "report", help="rewrite results.md, results.csv and figures from saved results"
    )
    report.add_argument("results_dir", help="the output folder of an experiment")
    report.set_defaults(handler=_report)
    return parser


def _run(arguments: argparse.Namespace) -> int:
    from contextnorm.experiments import headline_table, load_results, run_experiment

    config = load_config(arguments.config, arguments.overrides)
    start = time.perf_counter()
    results_dir = run_experiment(config, echo=lambda line: print(line, flush=True))
    print()
    print(headline_table(load_results(results_dir)))
    print(
        f"\nFinished in {time.perf_counter() - start:.0f} s. "
        f"Results, tables and figures: {results_dir}"
    )
    return 0


def _report(arguments: argparse.Namespace) -> int:
    from contextnorm.experiments import headline_table, load_results, write_report

    markdown = write_report(arguments.results_dir)
    print(headline_table(load_results(arguments.results_dir)))
    print(f"\nWrote {markdown} and the figures next to it.")
    return 0


def _list(arguments: argparse.Namespace) -> int:
    from contextnorm.contexts import CONTEXT_KINDS
    from contextnorm.data import DATASETS
    from contextnorm.models import MODELS
    from contextnorm.training.methods import METHODS

    print("methods (`methods:` in a config):")
    for name, method in METHODS.items():
        print(f"  {name:<13} {method.summary}")
    print(f"\ndata sets (`data.name`): {', '.join(DATASETS)}")
    print(f"models (`model.name`): {', '.join(MODELS)}")
    print(f"context kinds (`contexts.kind`): {', '.join(CONTEXT_KINDS)}")
    print("\nshipped configs (`contextnorm run NAME`):")
    for name in shipped_configs():
        print(f"  {name:<28} {_first_comment(name)}")
    return 0


def _first_comment(name: str) -> str:
    text = (resources.files("contextnorm") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
