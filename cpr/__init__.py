"""CPR: checkpointing with partial recovery for DLRM training."""
from cpr.checkpointer import CPRCheckpointer, RecoveryError, RecoveryResult
from cpr.planning import ClusterProfile, plan

__all__ = ["CPRCheckpointer", "ClusterProfile", "RecoveryError", "RecoveryResult", "plan"]
