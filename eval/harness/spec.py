"""What an evaluation run is: a pipeline, the configurations to compare, prompts, seeds and call settings.

Everything a user gives is checked here, once, whether it comes from the command line or from a run folder's
spec.json: a bad value is a SpecError whose message names the argument, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

import torch

import accel
from accel.patch import METHODS


class SpecError(ValueError):
    """Bad input to the harness: reported as a one-line message, exit code 2."""


# The pipeline call's arguments a run may set, and the command-line flag behind each.
CALL_FLAGS = {"num_inference_steps": "--steps", "height": "--height", "width": "--width", "num_frames": "--frames",
              "guidance_scale": "--guidance"}
DTYPES = ("float32", "float16", "bfloat16")
METRICS = ("fidelity", "fid", "clip", "agreement", "flicker")


@dataclass(frozen=True)
class MethodConfig:
    """One row of the results table: "baseline", or an accel method with options."""

    method: str | None
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        if self.method is None:
            return "baseline"
        return f"{self.method}({self.options_text})" if self.options else self.method

    @property
    def options_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.options)

    @property
    def slug(self) -> str:
        """A folder name for the configuration's cached samples."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("_")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_options(text: str, given: str, flag: str) -> list[str]:
    """At the commas outside brackets and quotes: "mag_ratios=[1.0,0.9],threshold=0.1" is two options."""
    items, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise SpecError(f"{flag} {given!r}: unbalanced brackets or quotes in the options")
    return [*items, text[start:]]


def method_config(name: str | None, options: dict, given: str, flag: str = "--method") -> MethodConfig:
    """A checked configuration: a known method whose options its typed config accepts (`given`, `flag`: for messages)."""
    if name is None or name == "baseline":
        if options:
            raise SpecError(f"{flag} {given!r}: baseline takes no options")
        return MethodConfig(None)
    if name not in METHODS:
        raise SpecError(f"{flag} {given!r}: unknown method {name!r}; allowed: baseline, {', '.join(METHODS)}")
    try:  # the typed config checks each option's name and value (mag_cache's steps come from --steps later)
        accel.make_config(name, **options)
    except (ValueError, TypeError) as err:
        raise SpecError(f"{flag} {given!r}: {err}") from None
    return MethodConfig(name, tuple(options.items()))


def _options(text: str, flag: str, form: str) -> tuple[str, dict[str, str]]:
    """The method's name and each option's unparsed value, from "METHOD:key=value,key=value"."""
    name, _, opts = text.strip().partition(":")
    options = {}
    for item in filter(str.strip, _split_options(opts, text, flag)):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"{flag} {text!r}: malformed option {item!r}: expected {form}")
        if key in options:
            raise SpecError(f"{flag} {text!r}: option {key!r} given twice")
        options[key] = value.strip()
    return name.strip(), options


def parse_method(text: str) -> MethodConfig:
    """"baseline", "cg_taylor", or "cg_taylor:threshold=0.1,warmup_steps=4"."""
    name, options = _options(text, "--method", "METHOD:key=value,key=value")
    return method_config(name, {k: _value(v) for k, v in options.items()}, text)


SWEEP_FORM = "METHOD:KNOB=v1|v2|v3[,other=value]"


@dataclass(frozen=True)
class Sweep:
    """A line of a Pareto sweep: one method's knob over several values, its other options fixed."""

    method: str
    knob: str
    values: tuple
    fixed: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        """"method (knob)", with the fixed options after a semicolon: lines of one knob differ by them."""
        fixed = ", ".join(f"{k}={v}" for k, v in self.fixed)
        return f"{self.method} ({self.knob}{'; ' + fixed if fixed else ''})"

    def configs(self) -> list[MethodConfig]:
        return [MethodConfig(self.method, ((self.knob, v), *self.fixed)) for v in self.values]

    def to_json(self) -> dict:
        return {"method": self.method, "knob": self.knob, "values": list(self.values), "fixed": dict(self.fixed)}


def make_sweep(method, knob, values: list, fixed: dict, given: str) -> Sweep:
    """A checked sweep: every value makes a valid configuration (`given`: the --sweep text, for messages)."""
    if method in (None, "baseline"):
        raise SpecError(f"--sweep {given!r}: the baseline is in every sweep; name a method: {SWEEP_FORM}")
    if not isinstance(knob, str) or knob in fixed:
        raise SpecError(f"--sweep {given!r}: the knob must be an option name, not among the fixed options")
    if not values:
        raise SpecError(f"--sweep {given!r}: {knob} has no values; expected {SWEEP_FORM}")
    texts = [json.dumps(v, sort_keys=True) for v in values]
    twice = sorted({t for t in texts if texts.count(t) > 1})
    if twice:
        raise SpecError(f"--sweep {given!r}: {knob} value(s) {', '.join(twice)} given twice")
    for value in values:
        method_config(method, {knob: value, **fixed}, given, "--sweep")
    return Sweep(method, knob, tuple(values), tuple(fixed.items()))


def parse_sweep(text: str) -> Sweep:
    """"cg_taylor:schedule=2|3|4|5" or "taylorseer:cache_interval=2|3|4,disable_cache_before_step=3": the option with
    |-separated values is the knob (with none, the first option is: a one-point line), the others are fixed."""
    method, options = _options(text, "--sweep", SWEEP_FORM)
    if not options:
        raise SpecError(f"--sweep {text!r}: no knob to sweep; expected {SWEEP_FORM}")
    several = [k for k, v in options.items() if "|" in v]
    if len(several) > 1:
        raise SpecError(f"--sweep {text!r}: options {several} all have several values; sweep one knob per --sweep")
    knob = several[0] if several else next(iter(options))
    values = [v.strip() for v in options.pop(knob).split("|")]
    if not all(values):
        raise SpecError(f"--sweep {text!r}: an empty value among {knob}'s; expected {SWEEP_FORM}")
    return make_sweep(method, knob, [_value(v) for v in values], {k: _value(v) for k, v in options.items()}, text)


def sweep_from_json(d) -> Sweep:
    if not isinstance(d, dict) or set(d) != {"method", "knob", "values", "fixed"} or not isinstance(d["values"], list) \
            or not isinstance(d["fixed"], dict):
        raise SpecError(f"sweeps must be a list of {{method, knob, values (a list), fixed (an object)}}, got {d!r}")
    return make_sweep(d["method"], d["knob"], d["values"], d["fixed"], f"{d['method']}:{d['knob']}")


def load_prompts(path: str) -> list[str]:
    """One prompt per line, or a JSON list of strings."""
    if not os.path.isfile(path):
        raise SpecError(f"--prompts {path}: not an existing file (expected a text file, one prompt per line, or a JSON list)")
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"--prompts {path}: cannot be read as UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"--prompts {path}: not a valid JSON list ({err})") from None
        if not all(isinstance(p, str) for p in prompts):
            raise SpecError(f"--prompts {path}: the JSON list must hold strings only")
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise SpecError(f"--prompts {path}: holds no prompts (expected one prompt per line, or a JSON list)")
    return prompts


def _check_int(flag: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _check_call(call: dict) -> None:
    unknown = sorted(set(call) - set(CALL_FLAGS))
    if unknown:
        raise SpecError(f"call settings {unknown} are not among {sorted(CALL_FLAGS)}")
    for key, value in call.items():
        if key != "guidance_scale":
            _check_int(CALL_FLAGS[key], value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SpecError(f"--guidance must be a finite number >= 0, got {value!r}")


def check_device(device) -> None:
    """The device's spelling (its presence on this machine is checked only where samples are generated)."""
    allowed = "cpu, cuda, cuda:N or mps"
    try:
        kind = torch.device(device).type if isinstance(device, str) else None
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise SpecError(f"--device must be one of {allowed}, got {device!r}")


@dataclass
class RunSpec:
    pipeline: str
    configs: list[MethodConfig]
    prompts: list[str]
    seeds: int = 1
    call: dict = field(default_factory=dict)  # num_inference_steps, height, width, num_frames, guidance_scale
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 3  # timed rounds: each configuration once per round, interleaved, after a warm-up round
    metrics: tuple[str, ...] = METRICS
    sweeps: list[Sweep] = field(default_factory=list)  # a Pareto run's lines; its configs are theirs
    left_out: dict = field(default_factory=dict)  # a Pareto run: the default sweeps this pipeline cannot run, and why
    # A Pareto run's MagCache ratios, measured on its pipeline where the model has none of its own (pareto.py)
    mag_ratios: list[float] | None = None

    def __post_init__(self):
        self.configs = [MethodConfig(None)] + [c for c in self.configs if c.method is not None]
        self._check()

    def _check(self) -> None:
        if not isinstance(self.pipeline, str) or not self.pipeline.strip():
            raise SpecError(f"--pipeline must name a pipeline (a reference name, a folder or a cached id), got {self.pipeline!r}")
        labels = [c.label for c in self.configs]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise SpecError(f"{'--sweep' if self.sweeps else '--method'}: configuration(s) {twice} given twice; "
                            "each must differ")
        self._check_sweeps()
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise SpecError(f"--prompts must give at least one non-empty prompt, got {self.prompts!r}")
        _check_int("--seeds", self.seeds)
        _check_int("--repeats", self.repeats)
        _check_call(self.call)
        check_device(self.device)
        if self.dtype not in DTYPES:
            raise SpecError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise SpecError(f"metrics {unknown} are not among {list(METRICS)}")

    def _check_sweeps(self) -> None:
        names = [s.name for s in self.sweeps]
        if len(set(names)) < len(names):
            raise SpecError(f"--sweep: the same line is swept twice ({names}); lines of one knob must differ in their "
                            "fixed options")
        if self.sweeps and self.configs[1:] != [c for s in self.sweeps for c in s.configs()]:
            raise SpecError("configs must be the baseline and the sweeps' configurations, in order")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.left_out.items()):
            raise SpecError(f"left_out must map method names to reasons, got {self.left_out!r}")

    def jobs(self) -> list[tuple[int, int]]:
        """(prompt index, seed) pairs; a sample's seed depends on its prompt index, never on the process."""
        return [(i, 1000 * i + s) for i in range(len(self.prompts)) for s in range(self.seeds)]

    def to_json(self) -> dict:
        d = asdict(self)
        d["configs"] = [{"method": c.method, "options": dict(c.options), "label": c.label} for c in self.configs]
        d["metrics"] = list(self.metrics)
        d["sweeps"] = [s.to_json() for s in self.sweeps]
        if not self.sweeps:  # a plain run's spec.json as before: its folders still resume
            del d["sweeps"], d["left_out"]
        if self.mag_ratios is None:
            del d["mag_ratios"]
        return d

    @classmethod
    def from_json(cls, d) -> "RunSpec":
        """A spec.json, checked as the command line is (it may be hand-edited, truncated or from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(d, dict) or required - set(d) or set(d) - names:
            raise SpecError(f"expected an object with the keys {sorted(required)} and optionally "
                            f"{sorted(names - required)}, got {_describe_keys(d)}")
        d = dict(d)
        if not isinstance(d["configs"], list) or not all(isinstance(c, dict) and isinstance(c.get("options", {}), dict)
                                                         for c in d["configs"]):
            raise SpecError(f"configs must be a list of {{method, options}} objects, got {d['configs']!r}")
        d["configs"] = [method_config(c.get("method"), c.get("options", {}), c.get("label", str(c.get("method"))))
                        for c in d["configs"]]
        for key, kind in (("prompts", list), ("call", dict), ("metrics", list), ("sweeps", list), ("left_out", dict)):
            if key in d and not isinstance(d[key], kind):
                raise SpecError(f"{key} must be a JSON {kind.__name__}, got {d[key]!r}")
        d["metrics"] = tuple(d.get("metrics", METRICS))
        d["sweeps"] = [sweep_from_json(s) for s in d.get("sweeps", [])]
        return cls(**d)


def _describe_keys(d) -> str:
    return f"the keys {sorted(d)}" if isinstance(d, dict) else f"a JSON {type(d).__name__}"


def read_spec(run_dir: str) -> RunSpec:
    """The spec.json of a run folder, or a SpecError saying what is wrong with it."""
    path = os.path.join(run_dir, "spec.json")
    if not os.path.isfile(path):
        raise SpecError(f"{run_dir} is not a run folder (no spec.json)")
    try:
        data = json.load(open(path, encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"{path} is corrupt ({err}); rerun `accel-eval run` into a new --out") from None
    try:
        return RunSpec.from_json(data)
    except SpecError as err:
        raise SpecError(f"{path} is not a valid run spec: {err}") from None
