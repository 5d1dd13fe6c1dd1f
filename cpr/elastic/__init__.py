"""Real failures in a supervised job: the supervisor that replaces only a dead rank (`supervisor`), a
worker's place in the job's store (`membership`, with the store's schema in `keys`), and the worker's
recovery state machine (`job`: `ElasticJob`). `python -m cpr.run` starts one (`launch`).

The names are imported on first use: a supervisor needs none of the worker's (torch, TorchRec) to start.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ElasticJob": "job", "JobHooks": "job", "StepOutcome": "job", "is_peer_failure": "job",
            "Membership": "membership", "Supervisor": "supervisor"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
