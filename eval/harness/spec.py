"""What an evaluation run is: a pipeline, the configurations to compare, prompts, seeds and call settings."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from accel.patch import METHODS


class SpecError(ValueError):
    """Bad input to the harness: reported as a one-line message, exit code 2."""


@dataclass(frozen=True)
class MethodConfig:
    """One row of the results table: "baseline", or an accel method with options."""

    method: str | None
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        if self.method is None:
            return "baseline"
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.method}({opts})" if opts else self.method

    @property
    def slug(self) -> str:
        """A folder name for the configuration's cached samples."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("_")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_options(text: str) -> list[str]:
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
    return [*items, text[start:]]


def parse_method(text: str) -> MethodConfig:
    """"baseline", "cg_taylor", or "cg_taylor:threshold=0.1,warmup_steps=4"."""
    name, _, opts = text.strip().partition(":")
    if name == "baseline":
        if opts:
            raise SpecError("baseline takes no options")
        return MethodConfig(None)
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}; available: baseline, {', '.join(METHODS)}")
    options = []
    for item in filter(None, _split_options(opts)):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"malformed option {item!r} in {text!r}: expected key=value")
        options.append((key.strip(), _value(value.strip())))
    return MethodConfig(name, tuple(options))


def load_prompts(path: str) -> list[str]:
    """One prompt per line, or a JSON list of strings."""
    if not os.path.isfile(path):
        raise SpecError(f"prompts file not found: {path}")
    text = open(path, encoding="utf-8").read()
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"{path}: not a valid JSON list ({err})") from None
        if not all(isinstance(p, str) for p in prompts):
            raise SpecError(f"{path}: the JSON list must hold strings only")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise SpecError(f"{path}: no prompts")
    return prompts


@dataclass
class RunSpec:
    pipeline: str
    configs: list[MethodConfig]
    prompts: list[str]
    seeds: int = 1
    call: dict = field(default_factory=dict)  # num_inference_steps, height, width, num_frames, guidance_scale...
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 3  # timed repeats of one sample per configuration, after a warm-up
    metrics: tuple[str, ...] = ("fidelity", "fid", "clip", "agreement", "flicker")

    def __post_init__(self):
        if not self.configs or self.configs[0].method is not None:
            self.configs = [MethodConfig(None)] + [c for c in self.configs if c.method is not None]
        if self.seeds < 1 or self.repeats < 1:
            raise SpecError("seeds and repeats must be >= 1")

    def jobs(self) -> list[tuple[int, int]]:
        """(prompt index, seed) pairs; a sample's seed depends on its prompt index, never on the process."""
        return [(i, 1000 * i + s) for i in range(len(self.prompts)) for s in range(self.seeds)]

    def to_json(self) -> dict:
        d = asdict(self)
        d["configs"] = [{"method": c.method, "options": dict(c.options), "label": c.label} for c in self.configs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["configs"] = [MethodConfig(c["method"], tuple(c["options"].items())) for c in d["configs"]]
        d["metrics"] = tuple(d["metrics"])
        return cls(**d)
