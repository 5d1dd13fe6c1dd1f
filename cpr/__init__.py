"""CPR: checkpointing with partial recovery for DLRM training."""
__version__ = "0.1.0"  # read by pyproject.toml (static: the build does not import the package)

from cpr.checkpointer import CPRCheckpointer
from cpr.errors import CPRError, RecoveryError
from cpr.planning import ClusterProfile, plan
from cpr.planning.clock import EmulatedClock, RealClock
from cpr.recovery import RecoveryResult

__all__ = ["__version__", "CPRCheckpointer", "CPRError", "ClusterProfile", "EmulatedClock", "RealClock", "RecoveryError", "RecoveryResult", "plan"]
