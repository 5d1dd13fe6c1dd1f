"""CPR: checkpointing with partial recovery for DLRM training."""
__version__ = "0.1.0"  # read by pyproject.toml (static: the build does not import the package)

from cpr.checkpointer import CPRCheckpointer, RecoveryError, RecoveryResult
from cpr.planning import ClusterProfile, plan

__all__ = ["__version__", "CPRCheckpointer", "ClusterProfile", "RecoveryError", "RecoveryResult", "plan"]
