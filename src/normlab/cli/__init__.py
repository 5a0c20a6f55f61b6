"""The `normlab` command: a thin layer over run_study, build_report and load_results.

    normlab run STUDY [--scale smoke|reduced|paper] [--data NAME] [--set key=value ...]
                      [--out DIR] [--device DEV] [--workers N] [--pack K] [--dry-run]
                      [--executor local|slurm|ray] [--checkpoint-every EVERY] [--slurm-...]
                      [--log-to tensorboard:DIR|mlflow:URI ...]
    normlab report DIR
    normlab show DIR
    normlab verify DIR
    normlab list [studies|norms|inits|data|probes|tasks|settings]
    normlab bench [NAME ...] [--quick] [--device DEV]
    normlab export DIR --to tensorboard OUT

Bad input (unknown study, setting or value, a device this machine lacks, an output folder that
cannot be written) exits with code 2 and one line per problem, all at once, before any run. A
damaged run file (`show`, `report`, `verify`), a run that failed, or a file system error exits
with code 1 and names the file. None prints a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import normlab
from normlab.cli.bench import run_benchmarks
from normlab.cli.export import add_export_parser
from normlab.cli.listing import study_lines, study_rows
from normlab.execute.args import (
    add_executor_arguments,
    check_executor_arguments,
    executor_from_args,
)
from normlab.runs.spec import RunSpec, settings_help
from normlab.runs.store import CorruptRecordError, RunStore, read_json
from normlab.runs.verify import DamagedStoreError, damaged_runs, verify_store
from normlab.utils.config import ConfigError, check_choice, check_interval

if TYPE_CHECKING:
    from normlab.execute.state import RunState

LISTS = ("studies", "norms", "inits", "data", "probes", "tasks", "settings")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message (or the help)
        return int(exit_.code or 0)
    try:
        with _sigterm_raises():
            return args.handler(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"normlab: error: {problem}", file=sys.stderr)
        return 2
    except DamagedStoreError as err:
        for damage in err.damages:
            print(f"normlab: error: damaged: {damage}", file=sys.stderr)
        print(f"normlab: {err.advice}", file=sys.stderr)
        return 1
    except CorruptRecordError as err:
        print(f"normlab: error: corrupt run file: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a full disk, a read-only folder, ...: the file and the reason
        where = f"{err.filename}: " if err.filename else ""
        print(f"normlab: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated)
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        if args.command == "run":
            print(f"\nnormlab: {how}; finished runs are kept: run the same command again to "
                  "resume (an unfinished run goes on from its last checkpoint, if it has one).",
                  file=sys.stderr)
        else:
            print(f"\nnormlab: {how}.", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a run stops as on Ctrl-C (its lease released, a
    process pool shut down), and the command ends with a message and exit code 143."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated within the block (where signals can be handled: the main
    thread); the previous handler comes back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Parser(argparse.ArgumentParser):
    """argparse, with a value that starts with '-' taken as its option's value
    (`--checkpoint-every -1epochs`, so that the option's own check names what is wrong) and
    every usage error in one line instead of the whole usage (subparsers are of this class)."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        # argparse keeps its options in private attributes; only single-value ones are joined.
        takes_value = {option for action in self._actions if action.nargs is None
                       for option in action.option_strings}
        joined: list[str] = []
        for arg in args:
            if (joined and joined[-1] in takes_value and arg.startswith("-")
                    and arg.split("=")[0] not in self._option_string_actions):
                arg = f"{joined.pop()}={arg}"
            joined.append(arg)
        return super().parse_known_args(joined, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the "
                     "options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normlab", description="Run, report and inspect normlab studies.")
    parser.add_argument("--version", action="version", version=f"normlab {normlab.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a study (finished runs are skipped)")
    run.add_argument("study", help="study name (see `normlab list`)")
    run.add_argument("--scale", default="smoke", help="smoke | reduced | paper (default: smoke)")
    run.add_argument("--data", default=None, help="data set replacing the scale's default")
    run.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                     help="override a RunSpec setting in every run (repeatable; values are "
                          "parsed as JSON where the setting is not a string)")
    run.add_argument("--out", default=None, help="output folder (default: runs/STUDY-SCALE)")
    run.add_argument("--device", default=None,
                     help="device for runs whose device is 'auto' (e.g. cpu, cuda:1)")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes (spread over the GPUs; default: 1 on CPU, the "
                          "measured best per GPU, see docs/cli.md)")
    run.add_argument("--pack", type=int, default=None, metavar="K",
                     help="train up to K compatible runs as one computation (1: off; default: "
                          "the measured best for the device, see docs/cli.md)")
    run.add_argument("--log-to", dest="log_to", action="append", default=[],
                     metavar="TOOL:WHERE",
                     help="stream the runs to tensorboard:DIR or mlflow:URI while they run, "
                          "and export the study there at the end (repeatable; "
                          "docs/tracking.md)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the planned runs and how many are done; run nothing")
    add_executor_arguments(run)
    run.set_defaults(handler=_run)

    report = commands.add_parser("report", help="(re)write DIR/report.html")
    report.add_argument("dir")
    report.set_defaults(handler=_report)

    show = commands.add_parser("show", help="a summary table of the runs in DIR")
    show.add_argument("dir")
    show.set_defaults(handler=_show)

    verify = commands.add_parser("verify", help="check every file of DIR; name the damaged ones")
    verify.add_argument("dir")
    verify.set_defaults(handler=_verify)

    listing = commands.add_parser("list", help="list studies (or norms, inits, data, ...)")
    listing.add_argument("what", nargs="?", default="studies", help=" | ".join(LISTS))
    listing.set_defaults(handler=_list)

    bench = commands.add_parser("bench", help="run the benchmarks of a source checkout")
    bench.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="each benchmark's fast check")
    bench.add_argument("--device", default=None, help="device passed to each benchmark")
    bench.set_defaults(handler=_bench)
    add_export_parser(commands, _check_study_folder)
    return parser


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """`["lr=0.1", "norm=group"]` -> {"lr": "0.1", "norm": "group"}; all malformed items at once.

    Values stay strings here; `RunSpec.with_overrides` parses them to each setting's type.
    """
    out, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"The '--set' option takes KEY=VALUE; got {item!r}.")
        else:
            out[key.strip()] = value.strip()
    if problems:
        raise ConfigError(problems)
    return out


# -- commands -------------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    # imported on use: they import torch (1.3 s), which --help, list and verify do not need
    from normlab.execute.local import LocalExecutor
    from normlab.execute.preflight import duplicate_note, plan_problems
    from normlab.execute.state import run_states, without_result
    from normlab.execute.throughput import default_parallelism, plan_estimate
    from normlab.export.live import log_to_problems
    from normlab.report.columns import in_plan_order, plan_table
    from normlab.report.terminal import TerminalProgress, plan_summary, summary_table
    from normlab.runner import run_study
    from normlab.studies import StudyResults, get_study
    from normlab.studies.base import check_scale, read_study_file
    from normlab.studies.plan import follow_ups_so_far, plan_study, study_settings

    study, overrides, *_ = _all_or_problems(
        lambda: get_study(args.study),
        lambda: parse_overrides(args.settings),
        lambda: args.device is None or _check_device(args.device),
        lambda: args.workers is None or check_interval("--workers", args.workers, 1, kind=int,
                                                       low_open=False),
        lambda: args.pack is None or check_interval("--pack", args.pack, 1, kind=int,
                                                    low_open=False),
        lambda: args.out is None or _check_out(args.out),
        lambda: check_executor_arguments(args),
        also=lambda: _all_or_problems(
            lambda: check_scale(args.scale),
            lambda: _check_overrides(args, parse_overrides(args.settings))),
    )
    specs = plan_study(study, args.scale, args.data, overrides)
    out_dir = Path("runs") / f"{study.name}-{args.scale}" if args.out is None else Path(args.out)
    problems = plan_problems(specs, out_dir, args.device, data_present=not args.dry_run) \
        + log_to_problems(args.log_to, out_dir)
    if problems:
        raise ConfigError(problems)
    pack, workers = default_parallelism(args.pack, args.workers, args.device,  # checked
                                        specs)
    if args.dry_run:
        print(f"{study.name} at {args.scale} scale into {out_dir}")
        note = duplicate_note(specs)
        if note:
            print(f"note: {note}")
        damaged = set(damaged_runs(verify_store(out_dir)))
        planned = list(dict.fromkeys(specs)) if damaged else follow_ups_so_far(
            study, specs, StudyResults.load(out_dir), args.scale, overrides)
        print(plan_summary(plan_table(planned, RunStore(out_dir), damaged)))
        print(plan_estimate(planned, pack, fixed=args.pack is not None))
        follow_ups = study.follow_up_note(args.scale, study_settings(study, overrides)[0])
        if follow_ups:
            print(f"follow-up rounds: {follow_ups}; the table and the estimate hold the runs "
                  "the results so far decide.")
        return 0
    if args.device is not None:
        os.environ["NORMLAB_DEVICE"] = args.device
    executor = executor_from_args(
        args, LocalExecutor(workers, _pool_devices(workers, args.device), pack=pack))
    results = run_study(study, out_dir, args.scale, args.data, overrides, executor=executor,
                        progress=TerminalProgress(sys.stderr), preflight=False,
                        log_to=args.log_to)
    print(summary_table(in_plan_order(results.runs, read_study_file(out_dir)["run_ids"])))
    print(f"\nreport: {out_dir / 'report.html'}")
    failed = int((results.runs["status"] == "failed").sum()) if "status" in results.runs else 0
    if failed:
        print(f"normlab: {failed} run(s) failed (their errors are in the report's run table); "
              "run the same command again to retry them.", file=sys.stderr)
    missing = without_result(run_states(out_dir, read_study_file(out_dir)["run_ids"]))
    if missing:
        print(f"normlab: {_without_result_line(missing)}; run the same command again to "
              "resume them.", file=sys.stderr)
    return 1 if failed or missing else 0


def _without_result_line(missing: dict[str, RunState], named: int = 10) -> str:
    """"2 planned run(s) ended without a result: 3b52b12a3330 (unfinished), ..." (at most
    `named` runs named; `normlab show` lists every one)."""
    names = [f"{run_id[:12]} ({state})" for run_id, state in list(missing.items())[:named]]
    more = f" and {len(missing) - named} more" if len(missing) > named else ""
    return (f"{len(missing)} planned run(s) ended without a result: {', '.join(names)}{more}")


def _report(args: argparse.Namespace) -> int:
    # imported on use: they import torch (1.3 s), which --help, list and verify do not need
    from normlab.report import build_report

    _check_study_folder(Path(args.dir))
    print(build_report(args.dir))
    return 0


def _show(args: argparse.Namespace) -> int:
    # imported on use: they import torch (1.3 s), which --help, list and verify do not need
    from normlab.execute.state import run_states, states_summary
    from normlab.report.columns import in_plan_order
    from normlab.report.terminal import summary_table
    from normlab.studies import StudyResults
    from normlab.studies.base import read_study_file

    folder = Path(args.dir)
    _check_study_folder(folder)
    runs = StudyResults.load(folder).runs
    if (folder / "study.json").exists():
        run_ids = list(dict.fromkeys(read_study_file(folder).get("run_ids", [])))
        runs = in_plan_order(runs, run_ids)
    else:
        run_ids = list(runs.get("run_id", []))
    states = run_states(folder, run_ids)
    if not runs.empty:  # a run without result is "running" while a live writer holds it
        unfinished = runs["status"] == "unfinished"
        runs.loc[unfinished, "status"] = [states[run_id].kind
                                          for run_id in runs.loc[unfinished, "run_id"]]
    print(summary_table(runs))
    print(states_summary(states))
    return 0


def _verify(args: argparse.Namespace) -> int:

    folder = Path(args.dir)
    _check_study_folder(folder)
    runs = sum(1 for _ in RunStore(folder).run_dirs())
    print(f"{folder}: {runs} run folder(s), every file sound." if runs else
          f"{folder}: no run folder yet (no run of the plan has started), study.json sound.")
    return 0


def _check_study_folder(folder: Path) -> None:
    """ConfigError when `folder` is no study folder; DamagedStoreError naming each damaged file
    (with the command that redoes the damaged runs) when it is one with damage."""

    if not folder.is_dir():
        what = "a file" if folder.exists() else "not there"
        raise ConfigError(f"{folder} is not a study folder: it is {what}.")
    if not (folder / "study.json").is_file() and not (folder / "runs").is_dir():
        raise ConfigError(f"{folder} is not a study folder: it has neither study.json nor runs/.")
    damages = verify_store(folder)
    if damages:
        raise DamagedStoreError(damages, _redo_advice(folder))


def _redo_advice(folder: Path) -> str:
    """The command that moves the damaged runs aside and redoes them."""
    import shlex


    try:
        plan = read_json(folder / "study.json")
        command = ["normlab", "run", plan["study"], "--scale", plan["scale"]]
        command += ["--data", plan["data"]] if plan.get("data") else []
        for key, value in plan.get("overrides", {}).items():
            text = value if isinstance(value, str) else json.dumps(value)
            command += ["--set", f"{key}={text}"]
        command += ["--out", str(folder)]
        return f"to redo the damaged runs: {shlex.join(command)}"
    except (CorruptRecordError, KeyError, TypeError, AttributeError, OSError):
        return "`normlab run STUDY --out DIR` moves damaged runs to DIR/damaged/ and redoes them."


def _bench(args: argparse.Namespace) -> int:

    return run_benchmarks(args.names, quick=args.quick, device=args.device)


def _list(args: argparse.Namespace) -> int:
    check_choice("list", args.what, LISTS)
    for line in _LISTERS[args.what]():
        print(line)
    return 0


def _list_studies() -> list[str]:
    return study_lines(study_rows())


def _list_settings() -> list[str]:

    rows = settings_help()
    width = max(len(name) for name, _, _ in rows)
    return [f"{name.ljust(width)}  default {default!r}" + (f"  ({doc})" if doc else "")
            for name, default, doc in rows]


def _names(module: str, function: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        import importlib

        return list(getattr(importlib.import_module(module), function)())

    return names


_LISTERS: dict[str, Callable[[], list[str]]] = {
    "studies": _list_studies,
    "norms": _names("normlab.nn", "list_norms"),
    "inits": _names("normlab.nn", "list_inits"),
    "data": _names("normlab.data", "available"),
    "probes": _names("normlab.train.callbacks", "list_callbacks"),
    "tasks": _names("normlab.runs.tasks", "list_tasks"),
    "settings": _list_settings,
}


def _all_or_problems(*checks: Callable[[], Any],
                     also: Callable[[], Any] | None = None) -> list[Any]:
    """The value of each check, or one ConfigError with the problems of all that failed and,
    then, those of `also` too (a check that is only worth its problems)."""
    values, problems = [], []
    for check in checks:
        try:
            values.append(check())
        except ConfigError as err:
            problems.extend(err.problems)
    if problems and also is not None:
        try:
            also()
        except ConfigError as err:
            problems.extend(p for p in err.problems if p not in problems)
    if problems:
        raise ConfigError(problems)
    return values


def _check_overrides(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """The problems of `overrides`: planned with the study (its own settings, e.g.
    `replicates`, included) when it exists, as RunSpec settings when it does not."""
    # imported on use: they import torch (1.3 s), which --help, list and verify do not need
    from normlab.studies import get_study
    from normlab.studies.plan import plan_study

    try:
        study = get_study(args.study)
    except ConfigError:
        RunSpec().with_overrides(overrides)
        return
    plan_study(study, args.scale, args.data, overrides)


def _check_out(out: str) -> None:
    """An empty --out is refused: it would silently mean the default folder."""
    if not out.strip():
        raise ConfigError(f"The '--out' setting must be a folder path; got {out!r} (without "
                          "--out, the study goes to runs/STUDY-SCALE).")


def _check_device(device: str) -> None:
    """A bad --device fails with the RunSpec's own message for its 'device' setting."""

    RunSpec().replace(device=device)


def _pool_devices(workers: int, device: str | None) -> list[str] | None:
    """One GPU per worker process when there is a pool, GPUs, and no device was forced."""
    if workers == 1 or device is not None:
        return None
    import torch

    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] if count else None

