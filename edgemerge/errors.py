"""One exception family for everything edgemerge raises on purpose.

Every message says what is wrong, where (file, tensor, task) and how to fix it. The CLI prints
the message of an ``EdgemergeError`` as one line and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

import math


class EdgemergeError(Exception):
    """Base class: a user-facing problem with input, configuration or environment."""


class FormatError(EdgemergeError):
    """A bundle, safetensors or flat-image file is malformed, truncated or inconsistent."""


class CheckpointError(EdgemergeError):
    """Task checkpoints do not match the base model (keys, shapes, dtypes, non-finite values)."""


class ConfigError(EdgemergeError):
    """An option, method name, parameter or task name is invalid."""


class TaskError(ConfigError):
    """A task name that the bundle does not hold."""


class BackendError(EdgemergeError):
    """An optional backend (onnxruntime, torch, TensorRT) is missing or refused the model."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> str:
    """Message for an unknown name that lists the valid ones."""
    return f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid)) or '(none)'}"


def finite_score(value, where: str) -> float:
    """A validation score callback's value as a float; a ConfigError naming ``where`` (the task and
    what was scored) when it is not a finite number (NaN, inf, None, a string)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        raise ConfigError(f"score for {where} is {value!r}; it must be a finite number")
    return v
