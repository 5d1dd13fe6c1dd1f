"""A `python -m cpr.train` worker for the real-failure tests (run under `python -m cpr.run`).

It records what the tests check and injects the faults `--kill-at` cannot:
* every heal writes OUT/heal-<rank>-<n>.json: a digest of this rank's rows and row-wise optimizer state
  just before the heal and just after it, and whether the rank kept its state;
* a replacement writes OUT/joined-<rank>-<generation>.pt: its rows and row-wise state right after it joined;
* CPR_TEST_KILL_IN_SAVE=STEP:RANK kills that rank while it writes its part of the step-STEP save (STEP 0:
  the initial save, before any save committed); CPR_TEST_KILL_JOINING=RANK kills that rank's first
  replacement while it joins. Each fault happens once per job (a marker file in OUT).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from cpr import elastic
from cpr.storage import store as store_module
from cpr.train import main, parse_args

OUT = Path(parse_args(sys.argv[1:]).out)
RANK = int(os.environ["RANK"])


def once(name: str) -> bool:
    try:
        (OUT / f".fault-{name}").open("x").close()
        return True
    except FileExistsError:
        return False


def tables_of(job: elastic.ElasticJob) -> dict[str, torch.Tensor]:
    tables = job.ckpt.tables
    out = {f"{t}/weight": tables.weight(t).detach().clone() for t in tables.tables}
    out.update({f"{t}/{s}": v.detach().clone() for t in tables.tables for s, v in tables.row_states(t).items()})
    return out


def digest(job: elastic.ElasticJob) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(tables_of(job).items()):
        h.update(name.encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


original_heal, original_form = elastic.ElasticJob._heal, elastic.ElasticJob._form


def heal(self, error, has_state, dropped_steps):
    before = digest(self) if has_state and self.ckpt is not None else None
    original_heal(self, error, has_state, dropped_steps)
    record = {"rank": RANK, "kept_state": before is not None, "before": before, "after": digest(self),
              "step": self.ckpt.global_step}
    (OUT / f"heal-{RANK}-{self.heals}.json").write_text(json.dumps(record))


def form(self, has_state, dropped_steps):
    victim = os.environ.get("CPR_TEST_KILL_JOINING")
    if not has_state and victim == str(RANK) and self.membership.newest_generation() > 0 and once("joining"):
        self.membership.join()  # die after joining the group, while the survivors wait for this rank
        os.kill(os.getpid(), signal.SIGKILL)
    original_form(self, has_state, dropped_steps)
    if self.replacement and not has_state:
        torch.save(tables_of(self), OUT / f"joined-{RANK}-{self.membership.generation}.pt")


original_write_part = store_module.CheckpointStore.write_part


def write_part(self, staging, name, step, kind, *args, **kwargs):
    spec = os.environ.get("CPR_TEST_KILL_IN_SAVE")
    if spec and spec == f"{step}:{RANK}" and once("save"):
        os.kill(os.getpid(), signal.SIGKILL)
    return original_write_part(self, staging, name, step, kind, *args, **kwargs)


elastic.ElasticJob._heal = heal
elastic.ElasticJob._form = form
store_module.CheckpointStore.write_part = write_part

if __name__ == "__main__":
    sys.exit(main())
