"""Which deaths are bugs that a restart cannot heal, read from what the dead worker last wrote.

Two kinds stop the job at once, with the worker's own message and a non-zero exit:
* a collective mismatch (the ranks called different collectives, or the same one with different sizes):
  gloo aborts the process from its transport thread (`gloo::EnforceNotMet ... Received data size doesn't
  match expected size`), NCCL reports it as a mismatch. "Recovering" it would train on inconsistent state;
* a worker that fails the same way twice before its first step (a deterministic start-up crash: a missing
  environment variable, a bad path): restarting it again only repeats the crash.

No torch here: the supervisor imports this, and so do workers (`is_collective_mismatch`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MISMATCH_SIGNATURES = (
    "Received data size doesn't match expected size",
    "Is there a distributed collective mismatch",
    "collective mismatch",
    "Detected mismatch between collectives",
)
# A line that says why a process failed: a Python exception's last line, a C++ abort, a fatal error.
_ERROR_LINE = re.compile(r"^(\w+(\.\w+)*(Error|Exception|Exit|NotMet)\b.*|error: .*|.*what\(\): .*|Fatal .*)$")


def is_collective_mismatch(text: str) -> bool:
    """Whether an error message (or a worker's output) reports a collective mismatch."""
    return any(signature in text for signature in MISMATCH_SIGNATURES)


def failure_message(tail: list[str]) -> str:
    """The line of a dead worker's last output that says why it failed ('' if none does)."""
    for line in reversed(tail):
        line = line.strip()
        if is_collective_mismatch(line):
            return line
    for line in reversed(tail):
        line = line.strip()
        if _ERROR_LINE.match(line):
            return line
    return ""


@dataclass(frozen=True)
class Failure:
    """One worker's death as its supervisor saw it."""

    rank: int
    returncode: int
    message: str  # from `failure_message`
    stepped: bool  # whether the rank had reported a finished step before it died


@dataclass(frozen=True)
class Verdict:
    """A death that is a bug: stop the job with `reason` (the worker's message) and exit `code`."""

    reason: str
    code: int = 1


class Judge:
    """Remembers the start-up failures seen (any rank's: it is one script) and tells a bug from a death
    worth a replacement."""

    def __init__(self) -> None:
        self._startup: set[tuple[int, str]] = set()

    def judge_all(self, failures: list[Failure]) -> Verdict | None:
        """The verdict on deaths seen together (ranks crashing alike at once are one try, not two)."""
        seen = set(self._startup)
        verdicts = [self._judge(failure, seen) for failure in failures]
        return next((v for v in verdicts if v is not None), None)

    def _judge(self, failure: Failure, seen: set[tuple[int, str]]) -> Verdict | None:
        if is_collective_mismatch(failure.message):
            return Verdict(f"rank {failure.rank} hit a collective mismatch (a bug: the ranks ran different "
                           f"collectives; not recovered): {failure.message}")
        if failure.stepped or failure.returncode <= 0 or not failure.message:
            # A signal (a kill, the OOM killer) or a death after training began is what replacements are for.
            return None
        how = (failure.returncode, failure.message)
        if how in seen:
            return Verdict(f"rank {failure.rank} failed the same way twice before its first step (exit code "
                           f"{failure.returncode}), so restarting it cannot help: {failure.message}")
        self._startup.add(how)
        return None
