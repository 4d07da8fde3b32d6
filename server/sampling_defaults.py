"""Default sampling parameters: OpenAI's, or the checkpoint's `generation_config.json`.

Invariant: a request field left unset (None) takes the value here, and only then; a field the
request sets is never changed. `openai` defaults are temperature 1, top_p 1 and no top-k, min-p
or repetition penalty. `model` defaults (SGLang's `--sampling-defaults model`, vLLM's
`--generation-config auto`) replace those with the values generation_config.json holds for
temperature, top_p, top_k, min_p and repetition_penalty; a field it does not hold keeps OpenAI's.
Llama 4's checkpoints ship temperature 0.6 and top_p 0.9.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("pyllama4.serve")

GENERATION_CONFIG = "generation_config.json"
MODES = ("model", "openai")


def _real(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float | None]:
    def check(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        value = float(value)
        above = value > low if low_open else value >= low
        return value if math.isfinite(value) and above and value <= high else None

    return check


def _top_k(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        return None
    return -1 if value == 0 else value  # transformers' 0 means no top-k, as -1 does here


# field -> the value a request may take (None: out of range or of the wrong type)
_FIELDS = {
    "temperature": _real(0.0, 2.0),
    "top_p": _real(0.0, 1.0, low_open=True),
    "top_k": _top_k,
    "min_p": _real(0.0, 1.0),
    "repetition_penalty": _real(0.0, 2.0, low_open=True),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """The value of each sampling field a request leaves unset, and where they come from."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = "openai"  # "openai", or the generation_config.json they were read from
    from_file: tuple[str, ...] = ()  # the fields generation_config.json set

    def describe(self) -> str:
        if not self.from_file:
            return f"sampling defaults: OpenAI's (temperature=1 top_p=1); {self.source}"
        values = " ".join(f"{name}={getattr(self, name):g}" for name in self.from_file)
        return f"sampling defaults from {GENERATION_CONFIG}: {values}"


def read_generation_config(directory: Path) -> tuple[SamplingDefaults, list[str]]:
    """The defaults `directory`'s generation_config.json gives (OpenAI's where it is silent or
    absent) and a warning for each sampling value it holds that a request could not take."""
    path = directory / GENERATION_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return SamplingDefaults(source=f"no {GENERATION_CONFIG} in {directory}"), []
    except (OSError, ValueError) as e:
        return SamplingDefaults(source=f"{path} unreadable"), [f"{path}: cannot read it ({e})"]
    if not isinstance(config, dict):
        return SamplingDefaults(source=f"{path} unreadable"), [f"{path}: not a JSON object"]
    values: dict[str, Any] = {}
    warnings = []
    for name, check in _FIELDS.items():
        if config.get(name) is None:
            continue
        value = check(config[name])
        if value is None:
            warnings.append(f"{path}: {name}={config[name]!r} is out of range; not used")
            continue
        values[name] = value
    source = str(path) if values else f"{path} sets none of them"
    defaults = replace(SamplingDefaults(), **values, source=source, from_file=tuple(values))
    return defaults, warnings


def resolve(mode: str, checkpoint: Path, generation_config: str | None) -> SamplingDefaults:
    """The defaults for `--sampling-defaults mode` and vLLM's `--generation-config` (auto: the
    checkpoint's file; vllm: OpenAI's; a directory: its generation_config.json); logged."""
    if generation_config == "vllm":
        mode = "openai"
    if mode == "openai":
        defaults = SamplingDefaults(source="--sampling-defaults openai")
    else:
        directory = checkpoint
        if generation_config not in (None, "auto"):
            directory = Path(generation_config).expanduser()
        defaults, warnings = read_generation_config(directory)
        for line in warnings:
            log.warning("%s", line)
    log.info("%s", defaults.describe())
    return defaults
