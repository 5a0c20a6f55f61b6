"""The `normlab run` options that choose and configure the executor, and checkpointing.

    --executor local|slurm|ray     where the runs go (default local: in-process or --workers)
    --checkpoint-every 10min|2epochs|off
    --slurm-partition ... --slurm-array-parallelism, --slurm-config FILE   (slurm.py)
    --ray-address ADDRESS, --ray-gpus-per-run G, --ray-cpus-per-run C, --ray-max-retries N
                                                                           (ray.py)

`add_executor_arguments(parser)` adds them; `executor_from_args(args, local)` validates them
(ConfigError naming each bad setting) and returns the executor.
"""

from __future__ import annotations

import argparse
import os

from normlab.execute.local import Executor
from normlab.execute.ray import RayExecutor, RayResources, import_ray
from normlab.execute.slurm import SlurmExecutor, SlurmResources, import_submitit
from normlab.train.checkpoint import CHECKPOINT_ENV, CheckpointEvery
from normlab.utils.config import ConfigError, check_choice

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
    group.add_argument("--ray-address", default=None,
                       help="Ray cluster to join, e.g. 'auto' or ray://head:10001 (default: "
                            "start a local one)")
    group.add_argument("--ray-gpus-per-run", type=float, default=0.0,
                       help="GPU share of each run, e.g. 0.25 (default 0)")
    group.add_argument("--ray-cpus-per-run", type=float, default=1.0,
                       help="CPUs of each run (default 1)")
    group.add_argument("--ray-max-retries", type=int, default=3,
                       help="retries of a run whose worker is lost (default 3)")


def executor_from_args(args: argparse.Namespace, local: Executor) -> Executor:
    """The executor `args` ask for (`local` for --executor local); sets the checkpoint interval
    for the runs of this process (NORMLAB_CHECKPOINT_EVERY, inherited by workers and jobs)."""
    problems = []
    try:
        check_choice("executor", args.executor, EXECUTORS)
    except ConfigError as err:
        problems += err.problems
    if args.checkpoint_every is not None:
        try:
            CheckpointEvery.parse(args.checkpoint_every)
        except ConfigError as err:
            problems += err.problems
    executor = local
    builders = {"slurm": _slurm_executor, "ray": _ray_executor}
    if args.executor in builders:
        try:
            executor = builders[args.executor](args)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    if args.checkpoint_every is not None:
        os.environ[CHECKPOINT_ENV] = args.checkpoint_every
    return executor


def _slurm_executor(args: argparse.Namespace) -> Executor:
    resources = SlurmResources.from_settings(args.slurm_config, {
        flag.replace("-", "_"): getattr(args, f"slurm_{flag.replace('-', '_')}")
        for flag in SLURM_FLAGS})
    import_submitit()
    return SlurmExecutor(resources, job_name=f"normlab-{args.study}")


def _ray_executor(args: argparse.Namespace) -> Executor:
    resources = RayResources(args.ray_address, args.ray_gpus_per_run, args.ray_cpus_per_run,
                             args.ray_max_retries)
    import_ray()
    return RayExecutor(resources)
