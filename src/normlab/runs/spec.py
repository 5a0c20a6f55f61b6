"""RunSpec: everything one run needs, frozen, hashable and JSON round-tripping.

A run's identity is `spec.run_id`, a hash of its canonical JSON, so a study that is run again
skips the runs it already finished. Every field is validated when the spec is built; all problems
are reported at once in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from normlab.runs.task_registry import list_tasks
from normlab.utils.config import ConfigError, choice_problem, interval_problem, shown

Frozen = tuple  # a mapping frozen as a sorted tuple of (key, value) pairs
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_DEPTH = 1202  # the deepest CIFAR ResNet trained in He et al. (2016)
MAX_SEED = 2**31 - 1  # a seed every generator takes (numpy, torch, CUDA), with room for seed + i
MAX_NESTING = 16  # levels of lists and mappings in a mapping setting such as `options`


def _is_frozen_mapping(value: Any) -> bool:
    """True for a mapping frozen by `freeze`: a tuple of (str, value) pairs."""
    return isinstance(value, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value)


def freeze(value: Any) -> Any:
    """Turn mappings and lists into hashable, canonically ordered tuples (recursively)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def _thaw_mapping(pairs: Frozen) -> dict[str, Any]:
    return {k: _thaw(v) for k, v in pairs}


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        if value and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                         for p in value):
            return _thaw_mapping(value)
        return [_thaw(v) for v in value]
    return value


def _choices(kind: str) -> Callable[[], list[str]]:
    """Allowed names for a registry-backed setting, looked up when a spec is checked."""

    def lookup() -> list[str]:
        # imported on use: nn and data import torch (1.3 s on the 2-core CPU); this module is
        # torch-free so that `import normlab` and the CLI start fast.
        if kind == "norm":
            from normlab.nn import list_norms

            return list_norms()
        if kind == "init":
            from normlab.nn import list_inits

            return list_inits()
        if kind == "data":
            from normlab.data import available

            return available()
        if kind == "task":
            return list_tasks()
        raise KeyError(kind)

    return lookup


def _setting(default: Any, *, choices: Any = None, low: float | None = None,
             high: float = math.inf, kind: type | None = None, low_open: bool = True,
             high_open: bool = True, optional: bool = False, doc: str = "") -> Any:
    meta = {"choices": choices, "low": low, "high": high, "kind": kind, "low_open": low_open,
            "high_open": high_open, "optional": optional, "doc": doc}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: freeze(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunSpec:
    """One run: data, model, normalization, initialization, optimizer, schedule, budget, seed.

    `task` picks what is run ("train" by default; studies register measurement tasks).
    Mapping-valued settings (`norm_options`, `data_options`, `options`, each probe) are stored
    frozen; read them back with `spec.mapping("options")`.
    """

    task: str = _setting("train", choices=_choices("task"), doc="what is run")
    group: str = _setting("", kind=str, doc="a label inside a study, e.g. 'E1'")
    # data
    data: str = _setting("digits", choices=_choices("data"), doc="data set name")
    data_options: Frozen = _setting({}, doc="options for normlab.data.load")
    augment: bool = _setting(True, kind=bool,
                             doc="random pad-crop (and flip where the data set allows)")
    # model
    model: str = _setting("resnet", choices=lambda: ["resnet", "plain_cnn", "mlp"])
    depth: int = _setting(20, kind=int, low=1, low_open=False, high=MAX_DEPTH, high_open=False,
                          doc="number of weight layers")
    width: int = _setting(16, kind=int, low=1, low_open=False, high=4096, high_open=False,
                          doc="channels of the first stage")
    norm: str = _setting("batch", choices=_choices("norm"))
    norm_options: Frozen = _setting({}, doc="options for make_norm, e.g. groups, rmax, dmax")
    norm_placement: str = _setting("every_conv", choices=lambda: ["every_conv", "single"])
    init: str = _setting("kaiming_normal", choices=_choices("init"))
    init_gain: float = _setting(1.0, low=0.0)
    # optimizer
    batch_size: int = _setting(128, kind=int, low=1, low_open=False)
    lr: float = _setting(0.1, low=0.0, doc="peak learning rate")
    momentum: float = _setting(0.9, low=0.0, high=1.0, low_open=False)
    nesterov: bool = _setting(False, kind=bool)
    weight_decay: float = _setting(5e-4, low=0.0, low_open=False, doc="L2 coefficient (coupled)")
    update_projection: str = _setting("none", choices=lambda: ["none", "tangential", "radial"])
    # schedule and budget
    schedule: str = _setting("step", choices=lambda: ["constant", "step", "cosine", "one_cycle"])
    milestones: tuple = _setting((0.5, 0.75), doc="fractions of training where step decay applies")
    lr_decay: float = _setting(0.1, low=0.0, high=1.0, doc="factor at each step milestone")
    warmup: float = _setting(0.0, low=0.0, high=1.0, low_open=False,
                             doc="fraction of training spent in linear warm-up")
    epochs: float = _setting(10.0, low=0.0, doc="budget in epochs (ignored when steps is set)")
    steps: int | None = _setting(None, kind=int, low=1, low_open=False, optional=True,
                                 doc="budget in optimizer steps; overrides epochs")
    # run control
    seed: int = _setting(0, kind=int, low=0, low_open=False, high=MAX_SEED, high_open=False)
    device: str = _setting("auto", kind=str, doc="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    diverge_loss: float = _setting(1e3, low=0.0, doc="mini-batch loss above which a run diverged")
    log_every: int = _setting(10, kind=int, low=1, low_open=False, doc="steps between metric rows")
    channels_last: bool = _setting(False, kind=bool)
    compile: bool = _setting(False, kind=bool)
    autocast: str = _setting("none", choices=lambda: ["none", "bf16"])
    probes: tuple = _setting([], doc="probe schedules: mappings with 'name', 'every' and options")
    options: Frozen = _setting({}, doc="task-specific options")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            frozen = freeze(value)
            if f.name == "milestones" and isinstance(frozen, tuple):
                frozen = tuple(float(m) if isinstance(m, int) else m for m in frozen)
            if frozen is not value:
                object.__setattr__(self, f.name, frozen)
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # -- validation ---------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every invalid setting of this spec, one sentence each."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("optional") and value is None:
                continue
            if meta.get("choices") is not None:
                allowed = meta["choices"]()
                if value not in allowed:
                    out.append(choice_problem(f.name, value, allowed))
            elif meta.get("low") is not None or meta.get("kind") in (int, float):
                kind = meta.get("kind") or float
                low = meta["low"] if meta["low"] is not None else -math.inf
                problem = interval_problem(f.name, value, low, meta["high"], kind=kind,
                                           low_open=meta["low_open"],
                                           high_open=meta["high_open"])
                if problem:
                    out.append(problem)
            elif meta.get("kind") is not None and not isinstance(value, meta["kind"]):
                out.append(f"The {f.name!r} setting must be a {meta['kind'].__name__}; "
                           f"got {shown(value)}.")
        if not (isinstance(self.milestones, tuple)
                and all(isinstance(m, float) and 0.0 < m < 1.0 for m in self.milestones)):
            out.append(f"The 'milestones' setting must be fractions of training in (0, 1); "
                       f"got {_thaw(self.milestones)!r}.")
        for name in ("data_options", "norm_options", "options"):
            if not _is_frozen_mapping(getattr(self, name)):
                out.append(f"The {name!r} setting must be a mapping of names to values; "
                           f"got {shown(_thaw(getattr(self, name)))}.")
            elif _nesting(getattr(self, name)) > MAX_NESTING:
                out.append(f"The {name!r} setting may nest lists and mappings at most "
                           f"{MAX_NESTING} levels deep; got {_nesting(getattr(self, name))}.")
        if not isinstance(self.probes, tuple):
            out.append(f"The 'probes' setting must be a list of mappings; got {self.probes!r}.")
        for probe in self.probes if isinstance(self.probes, tuple) else ():
            if not (_is_frozen_mapping(probe) and "name" in dict(probe)):
                out.append(f"Each entry of the 'probes' setting must be a mapping with a 'name'; "
                           f"got {_thaw(probe)!r}.")
        if isinstance(self.device, str) and not _DEVICE.fullmatch(self.device):
            out.append(f"The 'device' setting must be one of 'auto', 'cpu', 'cuda', 'cuda:N', "
                       f"'mps'; got {shown(self.device)}.")
        if (self.model in ("resnet", "plain_cnn") and isinstance(self.depth, int)
                and ((self.depth - 2) % 6 or self.depth < 8)):
            out.append(f"The 'depth' setting must be 6n+2 for a CIFAR ResNet or plain CNN "
                       f"(8, 14, 20, 32, 44, 56, 110, ...); got {self.depth!r}.")
        return out

    # -- identity and serialization -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("data_options", "norm_options", "options"):
                value = _thaw_mapping(value)
            elif f.name == "probes":
                value = [_thaw_mapping(p) for p in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"Unknown setting {k!r}; valid settings are "
                               f"{', '.join(sorted(known))}." for k in unknown])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_dict(json.loads(text))

    @property
    def run_id(self) -> str:
        """12 hex digits of the SHA-256 of the canonical JSON: the run's folder name."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def mapping(self, name: str) -> dict[str, Any]:
        """A mapping-valued setting ('norm_options', 'data_options', 'options') as a dict."""
        return _thaw_mapping(getattr(self, name))

    def task_options(self, defaults: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`options` laid over the task's `defaults`, and one problem per key it does not take."""
        options = {**defaults, **self.mapping("options")}
        problems = [f"The 'options' setting of the {self.task!r} task may only hold "
                    f"{', '.join(repr(k) for k in defaults)}; got {key!r}."
                    for key in options if key not in defaults]
        return options, problems

    def probe_schedules(self) -> list[dict[str, Any]]:
        return [_thaw_mapping(p) for p in self.probes]

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, str | Any]) -> RunSpec:
        """Apply `key=value` settings (strings from the CLI are parsed to the field's type)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        problems = [f"Unknown setting {k!r}; valid settings are {', '.join(sorted(fields))}."
                    for k in overrides if k not in fields]
        parsed = {}
        for key, value in overrides.items():
            if key in fields:
                try:
                    parsed[key] = parse_setting(getattr(self, key), value, key)
                except ConfigError as err:
                    problems.extend(err.problems)
        try:
            spec = self.replace(**parsed)
        except ConfigError as err:  # report bad values together with unknown keys
            problems.extend(err.problems)
        if problems:
            raise ConfigError(problems)
        return spec


def _nesting(value: Any) -> int:
    """Levels of lists and mappings (frozen as tuples) in `value`: 0 for a scalar."""
    if not isinstance(value, tuple):
        return 0
    if _is_frozen_mapping(value):
        return 1 + max((_nesting(v) for _, v in value), default=0)
    return 1 + max((_nesting(v) for v in value), default=0)


def parse_setting(current: Any, text: Any, name: str = "value") -> Any:
    """Parse a CLI string to the type of the setting's current value (JSON for the rest).

    Text that is not JSON stays a string (the setting's check then names it); JSON that Python
    refuses to hold (a number of more than 4300 digits, nesting deeper than the recursion limit)
    is a ConfigError naming the setting.
    """
    if not isinstance(text, str):
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return text
    if isinstance(current, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
    except ValueError as err:  # int too long to convert (Python's digit limit)
        reason = str(err).split(";")[0]
        raise ConfigError(f"The {name!r} setting could not be read ({reason}); got a value of "
                          f"{len(text)} characters.") from err
    except RecursionError as err:
        raise ConfigError(f"The {name!r} setting nests lists or mappings too deeply to read "
                          f"(at most {MAX_NESTING} levels are allowed).") from err


def settings_help() -> list[tuple[str, Any, str]]:
    """(name, default, description) for every RunSpec setting: the CLI's `--set` reference."""
    out = []
    for f in dataclasses.fields(RunSpec):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, _thaw(default) if isinstance(default, tuple) else default,
                    f.metadata.get("doc", "")))
    return out
