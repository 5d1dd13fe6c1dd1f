"""A plain torchrun script (no CPR in it) for the launcher tests: `env://` rendezvous, a loop of
all-reduces that resumes from its own per-rank progress file after a restart, as torchrun scripts do.

    python -m cpr.run --nproc-per-node 2 tests/torchrun_script.py OUT STEPS [crash|mismatch]

`crash`: every start fails at once the same way (a deterministic start-up bug); `mismatch`: at step 3 the
ranks all-reduce tensors of different sizes (a collective mismatch). Rank 0 writes OUT/result.json.
"""
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

out, steps, mode = Path(sys.argv[1]), int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else "")
if mode == "crash":
    raise RuntimeError("environment variable DATA_DIR expected, but not set")
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
progress = out / f"progress-{rank}.json"
state = json.loads(progress.read_text()) if progress.exists() else {"step": 0, "total": 0.0}
while state["step"] < steps:
    size = 10 + (rank if mode == "mismatch" and state["step"] == 3 else 0) * 1000
    t = torch.ones(size) * (state["step"] + 1)
    dist.all_reduce(t)
    state = {"step": state["step"] + 1, "total": state["total"] + float(t[0])}
    progress.write_text(json.dumps(state))
    time.sleep(0.05)
if rank == 0:
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "ROLE_RANK", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID")
    (out / "result.json").write_text(json.dumps({"state": state, "world": world, "env": {n: os.environ.get(n) for n in names}}))
dist.destroy_process_group()
