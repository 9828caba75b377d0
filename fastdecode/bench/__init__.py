"""Benchmarks behind `fastdecode bench BENCHMARK`: each is a module with `add_arguments(p)`
and `run(args) -> exit status`, registered in BENCHMARKS. Nothing heavy is imported here,
so building the CLI parser stays fast."""

from __future__ import annotations

import argparse
from importlib import import_module

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "longcontext": (
        "fastdecode.bench.longcontext",
        "long-context quality of the KV policies: needle, agreement, perplexity vs budget",
    ),
}


def add_subcommands(parser: argparse.ArgumentParser, formatter_class) -> None:
    """`fastdecode bench NAME ...`: one sub-parser per benchmark; sets args.bench_run."""
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", title="benchmarks")
    sub.required = True
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.DESCRIPTION,
            epilog=module.EPILOG,
            formatter_class=formatter_class,
        )
        module.add_arguments(p)
        p.set_defaults(bench_run=module.run)
