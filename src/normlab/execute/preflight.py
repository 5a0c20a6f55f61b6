"""Checks of a study's whole plan before its first run starts, every problem reported at once.

`plan_problems` looks at what `RunSpec` validation cannot see on its own: each task's options
(the check a task declares with `register_task_check`), the models (each distinct architecture
is built on PyTorch's "meta" device: no memory, about 0.3 s for a ResNet-110 on a CPU core), the
data (`data_problems`: each data set's options, its presence in the cache or else whether its
download address answers, and each batch size against its training split, all without loading
it), the devices the runs would use on this machine, the lease timings of the environment
(NORMLAB_LEASE_HEARTBEAT_S, NORMLAB_LEASE_STALE_S) and the output folder (a folder, writable,
with free disk, every path a run writes of the right kind and within the file system's name and
path limits). A plan that passes may still fail at run time (a run can run out of memory, a
download can break off), but none of the mistakes caught here costs a run.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from normlab.data import DataError
from normlab.data.base import check_dataset
from normlab.nn import build_model
from normlab.runs.lease import lease_timing
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import task_problems
from normlab.utils.config import ConfigError, shown

MIN_FREE_BYTES = 100 * 2**20  # a smoke study writes a few MiB; a paper-scale one tens of MiB
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
_ARCHITECTURE = ("model", "depth", "width", "norm", "norm_options", "norm_placement", "init",
                 "init_gain")


def plan_problems(specs: Sequence[RunSpec], out_dir: str | Path,
                  device: str | None = None, data_present: bool = True) -> list[str]:
    """Every problem of running `specs` into `out_dir` on this machine, one sentence each.

    `device` is the `--device` of the command line (used by runs whose device is "auto");
    `data_present=False` leaves out whether the data is cached or downloadable (a dry run on a
    machine that will not run the plan).
    """
    distinct = list(dict.fromkeys(specs))
    problems = [p for spec in distinct for p in task_problems(spec)]
    problems += model_problems(distinct)
    problems += data_problems(distinct, present=data_present)
    problems += device_problems(distinct, device)
    problems += lease_problems()
    problems += folder_problems(Path(out_dir))
    return list(dict.fromkeys(problems))


def duplicate_note(specs: Sequence[RunSpec]) -> str | None:
    """E.g. "60 specs, 1 distinct run: the overrides make 59 of them duplicates", or None."""
    distinct = len(set(specs))
    if distinct == len(specs):
        return None
    noun = "run" if distinct == 1 else "runs"
    return (f"{len(specs)} specs, {distinct} distinct {noun}: the overrides make "
            f"{len(specs) - distinct} of them duplicates, which are run once.")


def model_problems(specs: Iterable[RunSpec]) -> list[str]:
    """The problems of building each distinct architecture (e.g. groups that do not divide the
    channels), found by building it on the "meta" device."""
    import torch

    problems, seen = [], set()
    for spec in specs:
        key = tuple(getattr(spec, name) for name in _ARCHITECTURE)
        if key in seen:
            continue
        seen.add(key)
        where = (f"In runs with model={spec.model}, depth={spec.depth}, width={spec.width}, "
                 f"norm={spec.norm}, norm_options={spec.mapping('norm_options')}")
        try:
            with torch.device("meta"):
                build_model(spec.model, depth=spec.depth, width=spec.width, norm=spec.norm,
                            norm_options=spec.mapping("norm_options"),
                            norm_placement=spec.norm_placement, init=spec.init,
                            init_gain=spec.init_gain, input_shape=(3, 8, 8))
        except ConfigError as err:
            problems += [f"{where}: {problem}" for problem in err.problems]
        except Exception as err:  # any failure to build is a failure of every such run
            problems.append(f"{where}: the model cannot be built ({type(err).__name__}: "
                            f"{shown(str(err), 200)}).")
    return problems


def data_problems(specs: Iterable[RunSpec], present: bool = True) -> list[str]:
    """The problems of each distinct data set and options of the runs (`check_dataset`: a bad
    option; with `present`, data neither cached nor downloadable), and each `batch_size` larger
    than its data set's training split (every step draws a full batch). Nothing is loaded: a
    data set that registered no check has its options checked by name only, and its batch sizes
    not at all.

    Every run's data is checked, whether or not its task reads the data; the tasks that do not
    (e.g. "rmt") keep the defaults, which fit.
    """
    problems, sizes = [], {}
    for spec in specs:
        key = (spec.data, spec.data_options)
        if key not in sizes:
            sizes[key] = None
            options = spec.mapping("data_options")
            where = f"In runs on data {spec.data!r}" + (
                f" with data_options {options}" if options else "")
            try:
                sizes[key] = check_dataset(spec.data, present=present, **options)
            except ConfigError as err:
                problems += [f"{where}: {problem}" for problem in err.problems]
            except DataError as err:
                problems.append(f"{where}: {err}")
        size = sizes[key]
        if size is not None and spec.batch_size > size:
            problems.append(f"The 'batch_size' setting must be an int in [1, {size}] (the "
                            f"training images of {spec.data!r}, each step drawing a full "
                            f"batch); got {spec.batch_size}.")
    return problems


def lease_problems() -> list[str]:
    """The lease timings of the environment (runs.lease.lease_timing), read as a run will."""
    try:
        lease_timing()
    except ConfigError as err:
        return list(err.problems)
    return []


def device_problems(specs: Iterable[RunSpec], device: str | None = None) -> list[str]:
    """The devices the runs would use that this machine does not have.

    A run's device is its `device` setting, or for "auto" the `--device` option, else
    $NORMLAB_DEVICE, else "cuda" when CUDA is available and "cpu" otherwise.
    """
    env = os.environ.get("NORMLAB_DEVICE")
    asked: dict[str, str] = {}
    for spec in specs:
        if spec.device != "auto":
            asked.setdefault(spec.device, f"the 'device' setting {spec.device!r}")
        elif device is not None:
            asked.setdefault(device, f"--device {device}")
        elif env:
            asked.setdefault(env, f"NORMLAB_DEVICE={env}")
    return [problem for name, source in asked.items()
            if (problem := device_problem(name, source))]


def device_problem(name: str, source: str) -> str | None:
    """Why device `name` (given by `source`, e.g. "--device cuda") cannot be used here, or None."""
    import torch

    if not _DEVICE.fullmatch(name):
        return (f"{source}: the device must be one of 'cpu', 'cuda', 'cuda:N', 'mps'; "
                f"got {shown(name)}.")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if count == 0:
            return (f"{source}: CUDA is not available on this machine (torch "
                    f"{torch.__version__}); use --device cpu, or run where there is a GPU.")
        if index >= count:
            return f"{source}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}."
    if name == "mps" and not torch.backends.mps.is_available():
        return f"{source}: MPS (Apple GPU) is not available on this machine; use --device cpu."
    return None


def folder_problems(out_dir: Path, min_free: int | None = None) -> list[str]:
    """Whether runs can be written into `out_dir`: a folder (or creatable), every path a study
    writes in it of the right kind (`WRITTEN`), names within the file system's limits
    (`name_problems`), writable (probed by creating and removing an empty file, which also
    catches read-only and immutable folders, for root too), on a disk with `min_free` bytes free
    (default MIN_FREE_BYTES)."""
    min_free = MIN_FREE_BYTES if min_free is None else min_free
    runs = out_dir / "runs"
    problems = name_problems(out_dir)  # first: a stat of a name too long raises
    if problems:
        return problems
    if out_dir.exists() and not out_dir.is_dir():
        return [f"The output folder {out_dir} is a file, not a folder; choose another --out."]
    for name, folder in WRITTEN.items():
        path = out_dir / name
        if path.exists() and path.is_dir() != folder:
            return [f"{path} is a file, but the output folder keeps its {name} in a folder of "
                    "that name; move the file away or choose another --out." if folder else
                    f"{path} is a folder, but the study writes its {name} file there; move the "
                    "folder away or choose another --out."]
    existing = next((p for p in (runs, out_dir, *out_dir.absolute().parents) if p.exists()),
                    None)
    if existing is None or not existing.is_dir():
        return [f"The output folder {out_dir} cannot be created: {existing} is not a folder."]
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".normlab-probe-"):
            pass
    except OSError as err:
        return [f"The output folder {out_dir} cannot be written: {existing}: "
                f"{err.strerror or err}. Choose another --out."]
    free = shutil.disk_usage(existing).free
    if free < min_free:
        return [f"The disk of the output folder {out_dir} has {free / 2**20:.1f} MiB free; "
                f"normlab asks for at least {min_free / 2**20:.0f} MiB before it starts."]
    return []


# The paths a study writes in its folder, and whether each is a folder.
WRITTEN = {"runs": True, "leases": True, ".staging": True, "damaged": True, "figures": True,
           "study.json": False, "report.html": False}
# The most characters normlab adds below the folder: .staging/<run id>.<token>.new/ and an
# atomic write's temporary name (.<name>.<random>.tmp) take about 70; figure files and
# submitit's logs about 60. Rounded up.
LONGEST_INSIDE = 128


def name_problems(out_dir: Path) -> list[str]:
    """Names in `out_dir` too long for the file system of its first existing folder: a path
    component over NAME_MAX bytes, or a folder so deep that the paths of its runs
    (`LONGEST_INSIDE` more characters) would pass PATH_MAX."""
    existing = next(p for p in (*out_dir.absolute().parents, Path("/")) if _exists(p))
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    for part in out_dir.absolute().parts:
        if len(os.fsencode(part)) > name_max:
            return [f"The output folder {shown(str(out_dir), 80)} has a name of "
                    f"{len(os.fsencode(part))} bytes ({shown(part, 40)}); this file system "
                    f"allows at most {name_max}. Choose a shorter --out."]
    length = len(os.fsencode(str(out_dir.absolute())))
    if length + LONGEST_INSIDE >= path_max:
        return [f"The output folder {shown(str(out_dir), 80)} is a path of {length} bytes; the "
                f"files of its runs would pass this system's limit of {path_max} (they need "
                f"{LONGEST_INSIDE} more). Choose a shorter --out."]
    return []


def _pathconf(path: Path, name: str, default: int) -> int:
    """os.pathconf(path, name), or `default` where the system does not say."""
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError, AttributeError):
        return default


def _exists(path: Path) -> bool:
    """Path.exists, False for a name the system cannot even look up (too long)."""
    try:
        return path.exists()
    except OSError:
        return False
