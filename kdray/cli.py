"""The ``kdray`` command line (the app layer): ``train``, ``layers``, ``methods``, ``cache``, ``search``,
``results``, ``report``, ``models``, ``promote``.

Every command validates its input before any work starts; a :class:`~kdray.errors.KdrayError` becomes
one line on stderr and its exit code (2 for bad input). Each command imports what it uses inside its
function, on purpose: start-up time, and ``kdray models list`` / ``promote`` / ``results`` / ``train --track``
never load Ray or Optuna (tests/test_architecture.py checks it).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Callable

from kdray import __version__
from kdray.errors import ConfigError, KdrayError
from kdray.paths import check_cache_dir, check_free_output_dir, check_output_file
from kdray.report.tables import methods_text, render

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
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the output folder "
                                                            "(default: refuse a folder that is not empty)")
    p.add_argument("--generations", type=int, default=0, metavar="N",
                   help="born-again: N more generations, each taught (logit KD) by the previous one's student")
    p.add_argument("--track", action="store_true",
                   help="log to MLflow: one run (with --generations a parent run and a child per generation)")
    add_tracking_uri(p)
    p.add_argument("--experiment", help="MLflow experiment name with --track (default: the config's name)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from kdray.experiment.configs import load_config
    from kdray.experiment.run import run
    from kdray.report.tables import summary_table

    if args.generations < 0:
        raise ConfigError("--generations", args.generations, "0 or more")
    cfg = load_config(args.config, args.overrides)
    out = check_free_output_dir(args.output_dir if args.output_dir else Path(cfg.output_dir) / cfg.name,
                                "--output-dir" if args.output_dir else "output_dir", args.overwrite)
    check_cache_dir(cfg.cache_dir)
    tracker = None
    if args.track:
        from kdray.tracking.train_runs import TrainTracker

        tracker = TrainTracker(args.tracking_uri, args.experiment or cfg.name)
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends the runs KILLED, like Ctrl-C
    if args.generations:
        from kdray.experiment.run import born_again
        from kdray.report.tables import table

        gens = tracker.born_again(cfg, args.generations, out) if tracker else born_again(cfg, args.generations, out)
        print(table([[g, "teacher" if g == 0 else f"gen{g - 1}", f"{s.test_acc:.4f}", s.output_dir]
                     for g, s in enumerate(gens)], ["generation", "taught by", "test acc", "saved to"]))
        summary = gens[-1]
    else:
        summary = tracker.train(cfg, out) if tracker else run(cfg, output_dir=out)
    print(summary_table(summary))
    if tracker:
        tracker.report(summary.output_dir or out)
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
    p.add_argument("--probes", nargs="?", const="auto", metavar="POOLING",
                   help="also fit a Probe-KD probe on every block of the teacher (found from its structure), show "
                        "each one's validation accuracy beside the teacher's own, and plot them (trains the teacher if "
                        "needed); pooling: auto (default: a decoder's last real token, an encoder's mean over real "
                        "tokens, a feature map's mean), mean, max, flatten, first, seq_mean, last")
    p.add_argument("--layers", action="append", default=[], metavar="GLOB",
                   help="with --probes: probe the teacher modules matching this pattern instead of its blocks "
                        "(fnmatch, e.g. 'model.bert.encoder.layer.*.output'; repeatable)")
    p.add_argument("--plot", metavar="PNG", help="with --probes: where the plot goes (default "
                                                 "<name>-probes-<pooling>.png here)")
    p.set_defaults(func=cmd_layers)


def cmd_layers(args: argparse.Namespace) -> int:
    from kdray.experiment.configs import load_config
    from kdray.experiment.run import list_model_layers
    from kdray.report.tables import layers_table

    cfg = load_config(args.config, args.overrides)
    for flag, value in (("--plot", args.plot), ("--layers", args.layers)):
        if value and not args.probes:
            raise ConfigError(flag, value, "only with --probes")
    found = None
    if args.probes:
        from kdray.experiment.run import probe_layer_accuracies

        plot = Path(args.plot or f"{cfg.name}-probes-{args.probes}.png")
        check_output_file(plot, "--plot", "probes.png")
        found = probe_layer_accuracies(cfg, args.probes, args.layers)
    print(layers_table(list_model_layers(cfg, args.which), found.val_acc if found else None))
    if found is not None:
        from kdray.report.plots import probe_layers_plot
        from kdray.report.tables import probe_layers_table

        print()
        print(probe_layers_table(found))
        print(f"plot: {probe_layers_plot(found.probes, found.teacher_val_acc, plot, f'{cfg.name}: where the answer lives')}")
    return 0


@command
def add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the distillation methods: kind, what they read, layers, reference "
                                       "weight, paper")
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    print(methods_text(args.format))
    return 0


@command
def add_cache(sub: argparse._SubParsersAction) -> None:
    cmds = add_group(sub, "cache", "the teacher-output cache: build ahead of a search, list, remove", {
        "build": ("fill the cache for a search space (or an experiment config)", cmd_cache_build),
        "ls": ("list entries: key, teacher, data, size, layers, probes", cmd_cache_ls),
        "rm": ("remove entries", cmd_cache_rm)})
    cmds["build"].add_argument("path", help="search space or experiment config (YAML)")
    cmds["build"].add_argument("--address", help="Ray cluster whose workers run the teacher pass when "
                                                 "teacher_cache.workers is above 1 (default: a local Ray)")
    cmds["build"].add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    add_format(cmds["ls"])
    cmds["rm"].add_argument("keys", nargs="*", help="entry keys (see kdray cache ls)")
    cmds["rm"].add_argument("--all", action="store_true", help="remove every entry")
    for q in cmds.values():
        q.add_argument("--cache-dir", help="cache folder (default: $KDRAY_CACHE_DIR, else the user cache folder)")


def cmd_cache_build(args: argparse.Namespace) -> int:
    from kdray.experiment.run import prepare
    from kdray.experiment.space import configs_of_file
    from kdray.search.driver import search_cache
    from kdray.search.teacher_pass import ray_for_teacher_pass

    check_cache_dir(args.cache_dir)
    cfgs = configs_of_file(args.path, args.cache_dir)
    with ray_for_teacher_pass(cfgs[0].teacher_cache.workers, args.address, args.num_cpus):
        entry = search_cache(cfgs, prepare(cfgs[0]))  # one config, or every config a space's trials can draw
    if entry is None:
        print("nothing to cache (no teacher, augmented inputs, the cache turned off, or over its budget)")
        return 0
    m = entry.manifest
    print(f"{'hit' if entry.hit else 'built'} {entry.key}: {m['examples']} examples, {m['bytes'] / 1e6:.2f} MB "
          f"({m['bytes_per_example']:.0f} bytes/example) in {entry.path}")
    for r in m.get("probes", []):
        print(f"  probe {r['layer']} ({r['pooling']}): val acc {r['val_acc']:.4f}")
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    import pandas as pd

    from kdray.core import cache

    rows = cache.list_entries(args.cache_dir)
    print(render(pd.DataFrame(rows), args.format, hide=("path",)) if rows else "the teacher cache is empty")
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from kdray.core import cache

    names = cache.entry_names(args.cache_dir)  # unreadable entries too: rm is how they go
    keys = names if args.all else args.keys
    if not keys:
        raise ConfigError("keys", args.keys, "entry keys from `kdray cache ls`, or --all")
    missing = sorted(set(keys) - set(names))
    if missing:
        raise ConfigError("keys", missing, "keys of existing entries (see `kdray cache ls`)")
    for k in cache.remove_entries(keys, args.cache_dir):
        print(f"removed {k}")
    return 0


@command
def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run a Ray Tune + Optuna search over a search space file")
    p.add_argument("space", help="search space (YAML), e.g. search_spaces/quickstart.yaml")
    p.add_argument("--address", help="Ray address: auto, ray://host:10001 or host:port (default: a local Ray)")
    p.add_argument("--num-trials", type=int)
    p.add_argument("--concurrency", type=int, help="trials running at once")
    p.add_argument("--workers-per-trial", type=int, help="more than 1 runs each trial on Ray Train (DDP)")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--storage-path", help="local folder (default ./kdray_results), s3://, gs:// or an NFS path")
    p.add_argument("--scheduler", choices=["asha", "none"])
    p.add_argument("--searcher", choices=["tpe", "random"])
    p.add_argument("--tpe-startup-trials", type=int, help="TPE: random trials before it models the space (10)")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, help="ASHA: keep 1/factor of trials at each rung")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that is not stopped early")
    p.add_argument("--max-failures", type=int, help="retries of a failed trial from its last checkpoint")
    p.add_argument("--checkpoint-every-s", type=float, help="a trial checkpoints at ASHA's rungs, at its end, and "
                                                            "after an epoch ending this long after its previous "
                                                            "checkpoint (0: every epoch; default 0.5)")
    p.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=None,
                   help="run trial after trial in the same processes (default: on)")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier search of the same name "
                                                            "(default: refuse)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-baseline", action="store_true", help="skip the hard-label student trained for comparison")
    add_tracking_uri(p)
    p.add_argument("--experiment", help="MLflow experiment name (default: the space's name)")
    p.add_argument("--register-pareto", action="store_true",
                   help="multi-objective space: register every Pareto-optimal student (instead of the top K)")
    p.add_argument("--register-top", type=int, default=1, metavar="K",
                   help="register the students of the K best finished trials (default 1; 0: none); in a "
                        "multi-objective search the K Pareto-optimal ones best on the metric")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_search)


SEARCH_SETTINGS = ("num_trials", "concurrency", "workers_per_trial", "cpus_per_worker", "gpus_per_worker",
                   "scheduler", "searcher", "tpe_startup_trials", "grace_period", "reduction_factor", "max_epochs",
                   "max_failures", "seed", "checkpoint_every_s", "reuse_actors")


def cmd_search(args: argparse.Namespace) -> int:
    from kdray.redact import mask
    from kdray.search.driver import SearchOptions, run_search
    from kdray.search.results import status_counts, top_table

    if args.register_top < 0:
        raise ConfigError("--register-top", args.register_top, "0 (register nothing) or more")
    opts = SearchOptions(address=args.address, storage_path=args.storage_path, resume=args.resume,
                         overwrite=args.overwrite,
                         overrides={k: getattr(args, k) for k in SEARCH_SETTINGS}, num_cpus=args.num_cpus,
                         progress=not args.no_progress, baseline=not args.no_baseline,
                         tracking=not args.no_tracking, tracking_uri=args.tracking_uri, experiment=args.experiment,
                         register_top=args.register_top, register_pareto=args.register_pareto)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends a search like Ctrl-C: runs closed, state saved
    outcome = run_search(args.space, opts)
    metric = next(c for c in outcome.table.columns if c.startswith("best_")).removeprefix("best_") \
        if not outcome.table.empty else "val_acc"
    print(top_table(outcome.table, metric))
    print(f"trials: {status_counts(outcome.table)}; {outcome.seconds:.0f} s; "
          f"results in {mask(outcome.experiment_path)}")
    if outcome.baseline and not outcome.table.empty:
        best = outcome.table.iloc[0]
        print(f"best trial {best['trial_id']}: {metric} {best[metric]:.4f}, test_acc {best['test_acc']:.4f} | "
              f"hard-label student: {metric} {outcome.baseline['final_val_acc']:.4f}, "
              f"test_acc {outcome.baseline['test_acc']:.4f}")
    if outcome.mlflow_run_id:
        print(f"MLflow: search run {outcome.mlflow_run_id}")
    for r in outcome.registered:
        print(f"registered model {r['name']} version {r['version']}{' @' + r['alias'] if r['alias'] else ''} "
              f"<- trial {r['trial_id']} (rank {r['rank']}, run {r['run_id']})")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@command
def add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="point an alias of a registered model at a version (e.g. champion)")
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", required=True, help="the alias to set, e.g. champion")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--version", help="the model version to promote")
    src.add_argument("--from-alias", help="promote the version this alias points to (default: challenger)")
    p.add_argument("--force", action="store_true",
                   help="promote even if the candidate's val_acc is below the current holder's")
    add_tracking_uri(p)
    p.set_defaults(func=cmd_promote)


def add_group(sub: argparse._SubParsersAction, name: str, help: str,
              commands: dict[str, tuple[str, Callable[[argparse.Namespace], int]]]
              ) -> dict[str, argparse.ArgumentParser]:
    """A command made of sub-commands (``kdray cache ls``, ``kdray models list``): the parser of each entry of
    ``commands`` (name: (help, the function it runs)), for the caller to add its arguments."""
    group = sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_cmd", required=True)
    parsers = {}
    for cmd, (text, func) in commands.items():
        parsers[cmd] = group.add_parser(cmd, help=text)
        parsers[cmd].set_defaults(func=func)
    return parsers


def add_search_folder(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="search name (under --storage-path) or its folder")
    p.add_argument("--storage-path")


def add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def add_tracking_uri(p: argparse.ArgumentParser) -> None:
    from kdray.redact import credentials_to_env  # user:password@ of an HTTP URI: to the environment at once

    p.add_argument("--tracking-uri", type=credentials_to_env,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working "
                        "directory); http://user:password@host moves the credentials to MLFLOW_TRACKING_USERNAME/"
                        "PASSWORD")


def cmd_promote(args: argparse.Namespace) -> int:
    from kdray.tracking.registry_commands import promote

    mv, before = promote(args.name, args.alias, version=args.version, from_alias=args.from_alias,
                         tracking_uri=args.tracking_uri, force=args.force)
    moved = f" (was version {before})" if before and before != str(mv.version) else ""
    print(f"{args.name}@{args.alias} -> version {mv.version}{moved}")
    return 0


@command
def add_models(sub: argparse._SubParsersAction) -> None:
    cmds = add_group(sub, "models", "registered students in the MLflow model registry", {
        "list": ("versions, aliases, key metrics and creation time", cmd_models_list)})
    cmds["list"].add_argument("name", nargs="?", help="registered model name (default: every registered model)")
    add_format(cmds["list"])
    add_tracking_uri(cmds["list"])


def cmd_models_list(args: argparse.Namespace) -> int:
    from kdray.tracking.registry_commands import list_models

    df = list_models(args.name, tracking_uri=args.tracking_uri)
    if df.empty:
        print("no registered model" + (f" versions of {args.name}" if args.name else "s"))
        return 0
    print(render(df, args.format))
    return 0


@command
def add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="print the trials table of a search")
    add_search_folder(p)
    p.add_argument("--sort", help="column to sort by (default: the search metric)")
    p.add_argument("--ascending", action="store_true")
    p.add_argument("--top", type=int, default=20)
    add_format(p)
    p.set_defaults(func=cmd_results)


def cmd_results(args: argparse.Namespace) -> int:
    from kdray.search.results import read_results

    df = read_results(args.experiment, args.storage_path)
    if args.sort:
        if args.sort not in df.columns:
            raise ConfigError("--sort", args.sort, "one of " + ", ".join(df.columns))
        df = df.sort_values(args.sort, ascending=args.ascending, na_position="last")
    print(render(df.head(args.top), args.format, hide=("path", "error")))
    return 0


@command
def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of a search (tables and plots)")
    add_search_folder(p)
    p.add_argument("--output", "-o", help="HTML file (default: <experiment folder>/report.html)")
    p.add_argument("--metric", default="val_acc")
    p.add_argument("--mode", choices=["max", "min"], default="max")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from kdray.report.html import write_report
    from kdray.search.results import read_results, results_path

    df = read_results(args.experiment, args.storage_path)
    if args.metric not in df.columns:
        raise ConfigError("--metric", args.metric, "a column of the results: " + ", ".join(df.columns))
    folder = results_path(args.experiment, args.storage_path).parent
    out = Path(args.output or folder / "report.html")
    check_output_file(out, "--output", "report.html")
    out = write_report(df, folder.name, out, args.metric, args.mode)
    print(f"wrote {out}")
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
    from kdray.redact import mask, mask_logging

    mask_logging()  # no credential in any log line
    try:
        return args.func(args)
    except KdrayError as e:
        print(f"kdray: error: {mask(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"kdray: interrupted{': ' + mask(str(e)) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
