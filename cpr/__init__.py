"""CPR: checkpointing with partial recovery for DLRM training.

The names are imported on first use: `python -m cpr.train --help` and its argument errors need none of
torch or TorchRec.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # read by pyproject.toml (static: the build does not import the package)

_EXPORTS = {"CPRCheckpointer": "checkpointer", "CPRError": "errors", "RecoveryError": "errors",
            "ClusterProfile": "planning", "plan": "planning", "RecoveryResult": "recovery",
            "EmulatedClock": "planning.clock", "RealClock": "planning.clock"}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
