"""Recovery: reading saves back (`restore`), one strategy per recovery kind (`strategies`), the run's start
(`start`) and the rejoin of a re-formed group after a rank's death (`rejoin`)."""
from .rejoin import rejoin
from .restore import DomainRestore, Restorer, Rollback
from .start import start_run
from .strategies import (
    STRATEGIES,
    FullRecovery,
    NoRecovery,
    PartialRecovery,
    RecoveryResult,
    RecoveryStrategy,
    RejoinResult,
    RejoinRound,
)

__all__ = ["STRATEGIES", "DomainRestore", "FullRecovery", "NoRecovery", "PartialRecovery", "RecoveryResult",
           "RecoveryStrategy", "RejoinResult", "RejoinRound", "Restorer", "Rollback", "rejoin", "start_run"]
