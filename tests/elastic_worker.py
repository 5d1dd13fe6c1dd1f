"""A `python -m cpr.train` worker for the real-failure tests (run under `python -m cpr.run`).

It records what the tests check and injects the faults `--kill-at` cannot, through the seams `cpr.train.main`
offers (job hooks, and the store each checkpointer saves through):
* every heal writes OUT/heal-<rank>-<n>.json: a digest of this rank's rows and row-wise optimizer state
  just before the heal and just after it, and whether the rank kept its state;
* a replacement writes OUT/joined-<rank>-<generation>.pt: its rows and row-wise state right after it joined;
* CPR_TEST_KILL_IN_SAVE=STEP:RANK kills that rank while it writes its part of the step-STEP save (STEP 0:
  the initial save, before any save committed); CPR_TEST_KILL_JOINING=RANK kills that rank's first
  replacement while it joins; CPR_TEST_SLOW_JOIN=SECONDS makes the first replacement (or spare) sleep that
  long before it joins (a slow start on a loaded machine). Each fault happens once per job (a marker file in OUT).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from cpr.elastic import ElasticJob, JobHooks
from cpr.storage import CheckpointStore
from cpr.train import main
from cpr.options import parse_args

OUT = Path(parse_args(sys.argv[1:]).out)
RANK = int(os.environ["RANK"])


def once(name: str) -> bool:
    try:
        (OUT / f".fault-{name}").open("x").close()
        return True
    except FileExistsError:
        return False


def tables_of(job: ElasticJob) -> dict[str, torch.Tensor]:
    tables = job.ckpt.tables
    out = {f"{t}/weight": tables.weight(t).detach().clone() for t in tables.tables}
    out.update({f"{t}/{s}": v.detach().clone() for t in tables.tables for s, v in tables.row_states(t).items()})
    return out


def digest(job: ElasticJob) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(tables_of(job).items()):
        h.update(name.encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RecordingHooks(JobHooks):
    def __init__(self) -> None:
        self.before: str | None = None

    def before_heal(self, job: ElasticJob, has_state: bool) -> None:
        self.before = digest(job) if has_state else None

    def after_heal(self, job: ElasticJob, has_state: bool) -> None:
        record = {"rank": RANK, "kept_state": self.before is not None, "before": self.before, "after": digest(job),
                  "step": job.ckpt.global_step}
        (OUT / f"heal-{RANK}-{job.heals}.json").write_text(json.dumps(record))

    def before_join(self, job: ElasticJob, has_state: bool) -> None:
        slow = os.environ.get("CPR_TEST_SLOW_JOIN")
        if not has_state and slow and job.membership.newest_generation() > 0 and once("slow"):
            time.sleep(float(slow))
        victim = os.environ.get("CPR_TEST_KILL_JOINING")
        if not has_state and victim == str(RANK) and job.membership.newest_generation() > 0 and once("joining"):
            job.membership.join()  # die after joining the group, while the survivors wait for this rank
            os.kill(os.getpid(), signal.SIGKILL)

    def after_form(self, job: ElasticJob, has_state: bool) -> None:
        if job.replacement and not has_state:
            torch.save(tables_of(job), OUT / f"joined-{RANK}-{job.membership.generation}.pt")


class KillingStore(CheckpointStore):
    """Kills this process while it writes its part of the save CPR_TEST_KILL_IN_SAVE names."""

    def write_part(self, staging, part, step, kind, *args, **kwargs):
        if os.environ.get("CPR_TEST_KILL_IN_SAVE") == f"{step}:{RANK}" and once("save"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write_part(staging, part, step, kind, *args, **kwargs)


def make_store(directory, keep_last: int, lock: bool) -> CheckpointStore:
    return KillingStore(directory, keep_last=keep_last, lock=lock)


if __name__ == "__main__":
    sys.exit(main(job_hooks=RecordingHooks(), make_store=make_store))
