"""The `normlab run` options that choose and configure the executor, and checkpointing.

    --executor local|slurm|ray     where the runs go (default local: in-process or --workers)
    --checkpoint-every 10min|2epochs|off
    --slurm-partition ... --slurm-array-parallelism, --slurm-config FILE   (slurm.py)
    --ray-address ADDRESS, --ray-gpus-per-run G, --ray-cpus-per-run C, --ray-max-retries N
                                                                           (ray.py)

`add_executor_arguments(parser)` adds them; `check_executor_arguments(args)` refuses every bad
one at once (ConfigError naming each setting; a --slurm-* or --ray-* flag given without its
executor included), before anything runs; `executor_from_args(args, local)` returns the
executor. Importing this module does not import torch (`normlab --help` stays fast).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from normlab.execute.base import Executor
from normlab.execute.ray import RayExecutor, RayResources, address_problem, import_ray
from normlab.execute.slurm import SlurmExecutor, SlurmResources, import_submitit
from normlab.utils.config import ConfigError, choice_problem

EXECUTORS = ("local", "slurm", "ray")
SLURM_FLAGS = {  # flag suffix -> (type, help)
    "partition": (str, "partition (queue) to submit to"),
    "gpus-per-task": (int, "GPUs per run (default 0)"),
    "cpus-per-task": (int, "CPU cores per run (default 1)"),
    "mem-gb": (float, "memory per run in GB (default: the partition's)"),
    "time-min": (int, "time limit per run in minutes, before a requeue (default 60)"),
    "account": (str, "account to charge"),
    "qos": (str, "quality of service"),
    "constraint": (str, "node features, e.g. h100"),
    "array-parallelism": (int, "most runs of the array running at once (default 256)"),
}
RAY_FLAGS = {  # flag suffix -> (type, help); the defaults are RayResources'
    "address": (str, "Ray cluster to join, e.g. 'auto' or ray://head:10001 (default: start a "
                     "local one)"),
    "gpus-per-run": (float, "GPU share of each run, e.g. 0.25 (default 0)"),
    "cpus-per-run": (float, "CPUs of each run (default 1)"),
    "max-retries": (int, "retries of a run whose worker is lost (default 3)"),
}


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("executors and checkpoints (see docs/cluster.md)")
    group.add_argument("--executor", default="local", help=" | ".join(EXECUTORS)
                       + " (default: local)")
    group.add_argument("--checkpoint-every", default=None, metavar="EVERY",
                       help="checkpoint each run every N minutes ('10min', the default), N "
                            "epochs ('2epochs') or never ('off'); a restarted run resumes")
    for flag, (kind, text) in SLURM_FLAGS.items():
        group.add_argument(f"--slurm-{flag}", type=kind, default=None, help=text)
    group.add_argument("--slurm-config", default=None, metavar="FILE",
                       help="JSON file of SLURM settings (the flag names with underscores); "
                            "flags override it")
    for flag, (kind, text) in RAY_FLAGS.items():
        group.add_argument(f"--ray-{flag}", type=kind, default=None, help=text)


def check_executor_arguments(args: argparse.Namespace) -> None:
    """ConfigError listing every problem of the executor and checkpoint options: an unknown
    executor, a bad --checkpoint-every, a --slurm-*/--ray-* flag given without its executor, a
    bad resource, the executor's extra not installed."""
    # imported on use: normlab.train.checkpoint imports torch (1.3 s), which --help does not need
    from normlab.train.checkpoint import CheckpointEvery

    problems = []
    if args.executor not in EXECUTORS:
        problems.append(choice_problem("executor", args.executor, EXECUTORS))
    if args.checkpoint_every is not None:
        try:
            CheckpointEvery.parse(args.checkpoint_every)
        except ConfigError as err:
            problems += err.problems
    for executor in ("slurm", "ray"):
        given = [f"--{flag}" for flag in _given_flags(args, executor)]
        if given and args.executor != executor:
            problems.append(f"The {', '.join(repr(f) for f in given)} option"
                            f"{'s apply' if len(given) > 1 else ' applies'} only with "
                            f"'--executor {executor}'; got '--executor {args.executor}'.")
    if args.executor in ("slurm", "ray"):
        try:
            _resources(args)
            (import_submitit if args.executor == "slurm" else import_ray)()
        except ConfigError as err:
            problems += err.problems
    if args.executor == "ray" and (unreachable := address_problem(args.ray_address)):
        problems.append(unreachable)
    if problems:
        raise ConfigError(problems)


def executor_from_args(args: argparse.Namespace, local: Executor) -> Executor:
    """The executor `args` ask for (`local` for --executor local), once
    `check_executor_arguments` passes; sets the checkpoint interval for the runs of this
    process (NORMLAB_CHECKPOINT_EVERY, inherited by workers and jobs)."""
    # imported on use: normlab.train.checkpoint imports torch (1.3 s), which --help does not need
    from normlab.train.checkpoint import CHECKPOINT_ENV

    if args.checkpoint_every is not None:
        os.environ[CHECKPOINT_ENV] = args.checkpoint_every
    if args.executor == "slurm":
        return SlurmExecutor(_resources(args), job_name=f"normlab-{args.study}")
    if args.executor == "ray":
        return RayExecutor(_resources(args))
    return local


def _given_flags(args: argparse.Namespace, executor: str) -> list[str]:
    """The --slurm-* (or --ray-*) flags given on the command line, without the dashes."""
    flags = [*SLURM_FLAGS, "config"] if executor == "slurm" else list(RAY_FLAGS)
    return [f"{executor}-{flag}" for flag in flags
            if getattr(args, f"{executor}_{flag.replace('-', '_')}") is not None]


def _resources(args: argparse.Namespace) -> Any:
    """SlurmResources or RayResources from the flags (ConfigError naming each bad one)."""
    if args.executor == "slurm":
        return SlurmResources.from_settings(args.slurm_config, {
            flag.replace("-", "_"): getattr(args, f"slurm_{flag.replace('-', '_')}")
            for flag in SLURM_FLAGS})
    values = {flag.replace("-", "_"): getattr(args, f"ray_{flag.replace('-', '_')}")
              for flag in RAY_FLAGS}
    return RayResources(**{k: v for k, v in values.items() if v is not None})
