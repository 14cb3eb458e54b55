"""The ``kdray`` command line: ``train``, ``layers`` (and the search commands added by later modules).

Every command validates its input before any work starts; a :class:`~kdray.errors.KdrayError` becomes
one line on stderr and its exit code (2 for bad input).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from kdray import __version__
from kdray.errors import KdrayError

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
    COMMANDS[fn.__name__.removeprefix("add_")] = fn
    return fn


def _common_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. train.epochs=5 (repeatable)")


@command
def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one distillation experiment and print a summary")
    _common_config_args(p)
    p.add_argument("--output-dir", help="where to save the student and metrics (default: <output_dir>/<name>)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from kdray.config import load_config
    from kdray.report import summary_table
    from kdray.run import run

    cfg = load_config(args.config, args.overrides)
    out = Path(args.output_dir) if args.output_dir else Path(cfg.output_dir) / cfg.name
    summary = run(cfg, output_dir=out)
    print(summary_table(summary))
    if args.json:
        d = summary.to_dict()
        d.pop("history")
        print(json.dumps(d, default=str))
    return 0


@command
def add_layers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list every module path of teacher and student with its output shape")
    _common_config_args(p)
    p.add_argument("--which", choices=["teacher", "student", "both"], default="both")
    p.set_defaults(func=cmd_layers)


def cmd_layers(args: argparse.Namespace) -> int:
    from kdray.config import load_config
    from kdray.report import layers_table
    from kdray.run import list_model_layers

    cfg = load_config(args.config, args.overrides)
    print(layers_table(list_model_layers(cfg, args.which)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdray", description="Knowledge distillation experiments and searches.")
    parser.add_argument("--version", action="version", version=f"kdray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except KdrayError as e:
        print(f"kdray: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kdray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
