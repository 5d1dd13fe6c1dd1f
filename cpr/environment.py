"""CPR's environment variables, each with its default and its check, in one table read without torch.

The modules read their settings through `setting(NAME)`, and the command line calls `check_environment()`
before anything heavy loads: a bad value is one line naming the variable (exit 2), never a traceback from
deep inside an import.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cpr.elastic.keys import STORE_ENV, parse_endpoint
from cpr.errors import UsageError
from dlrm.cache import cache_megabytes

MAX_SECONDS = 10_000_000.0  # about 115 days: beyond it a wait is a hang (and timedelta's range is not far)


def seconds(text: str) -> float:
    """A timeout: a finite number of seconds in (0, MAX_SECONDS]."""
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise ValueError(text)
    return value


def folder(text: str) -> Path | None:
    """A folder CPR creates if missing (empty: unset); not an existing file."""
    if not text:
        return None
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(text)
    return path


@dataclass(frozen=True)
class EnvSetting:
    """One variable: its default (None: unset), what a value must be (as the error says it), its parser
    (ValueError for a bad value)."""

    name: str
    default: str | None
    expected: str
    parse: Callable[[str], Any]


SETTINGS: dict[str, EnvSetting] = {s.name: s for s in (
    EnvSetting("CPR_COLLECTIVE_TIMEOUT_S", "300", f"seconds, a number in (0, {MAX_SECONDS:.0f}]", seconds),
    EnvSetting("CPR_REJOIN_TIMEOUT_S", "120", f"seconds, a number in (0, {MAX_SECONDS:.0f}]", seconds),
    EnvSetting("CPR_DEATH_NOTICE_S", "30", f"seconds, a number in (0, {MAX_SECONDS:.0f}]", seconds),
    EnvSetting("CPR_CACHE", None, "a folder (not a file)", folder),
    EnvSetting("CPR_CACHE_MAX_MB", "1024", "a size in megabytes, 0 or more", cache_megabytes),
    EnvSetting("CPR_TRACE_COLLECTIVES", None, "a folder (not a file)", folder),
    EnvSetting(STORE_ENV, None, "HOST:PORT (set by the supervisor for its workers)", parse_endpoint),
)}


def setting(name: str) -> Any:
    """The parsed value of `name` from the environment, or its default (None when it has none)."""
    spec = SETTINGS[name]
    text = os.environ.get(name, spec.default)
    if text is None:
        return None
    try:
        return spec.parse(text)
    except (ValueError, OverflowError):
        raise UsageError(f"environment variable {name}={text!r}: expected {spec.expected}") from None


def check_environment() -> None:
    """Every CPR variable that is set, checked; UsageError naming the first bad one."""
    for name in SETTINGS:
        setting(name)
