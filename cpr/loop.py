"""The one training loop with failure injection and recovery, shared by the CLI, tests, benchmarks,
experiments and users' own scripts.

Every step: the learning rates for the model's step, the checkpointer sees the batch, forward, backward,
optimizer step, then `ckpt.step()` saves if the policy says so. Emulated failures of the schedule that
fall due are recovered as the policy prescribes (partial: the failed domain's rows come back; full: the
model, the step and the reader go back to the last full save and the lost steps are trained again). In a
multi-rank job every rank runs this loop with the same schedule; saves, recoveries and the final report
are collective.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

from cpr.checkpointer import CPRCheckpointer
from cpr.choices import LR_DECAYS
from cpr.comm import Coordinator
from cpr.elastic.job import ElasticJob, StepOutcome
from cpr.faults import FailureSchedule
from cpr.walltime import WallClock



class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed as written, so a crash loses nothing logged.
    Only the coordinator writes; on other ranks it is silent."""

    def __init__(self, path: str | Path | None, append: bool = False, coordinator: Coordinator | None = None) -> None:
        writes = path is not None and (coordinator is None or coordinator.is_coordinator)
        self._file: TextIO | None = open(path, "a" if append else "w") if writes else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:  # a full or vanished --out stops the log, not the training
            print(f"warning: metrics.jsonl cannot be written ({err.strerror or err}); no more metrics are logged",
                  file=sys.stderr)
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass(frozen=True)
class LoopResult:
    """What the loop did: final evaluation, steps, samples (all ranks) and where the time went."""

    eval: dict[str, float | None]
    steps: int
    steps_executed: int
    samples: int
    step_seconds: float  # forward, backward and optimizer only
    wall_seconds: float  # the whole loop: steps, saves and recoveries (not the final evaluation)
    recovery_seconds: float
    wall_clock: dict[str, Any] | None = None  # seconds by cause, overhead and goodput (cpr/walltime.py), rank 0's

    def summary(self) -> dict[str, Any]:
        return {
            **self.eval,
            "steps": self.steps,
            "steps_executed": self.steps_executed,
            "samples": self.samples,
            # wall clock, saves and recoveries included: what the job really delivers
            "samples_per_s": self.samples / self.wall_seconds if self.wall_seconds else 0.0,
            "step_samples_per_s": self.samples / self.step_seconds if self.step_seconds else 0.0,
            "wall_seconds": self.wall_seconds,
            "recovery_seconds": self.recovery_seconds,
            "wall_clock": self.wall_clock,
        }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, coordinator: Coordinator | None = None) -> dict[str, float | None]:
    """AUC and log loss over the whole evaluation set, any iterable of TorchRec `Batch`es for a model that
    returns `(loss, (_, logits, labels))` as TorchRec's `DLRMTrain` does (every rank's batches gathered). AUC
    is None when the set holds one class only: it is undefined, not 0."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        _, (_, batch_logits, batch_labels) = model(batch)
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.float().cpu())
    model.train()
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    if coordinator is not None and coordinator.world_size > 1:
        gathered = coordinator.all_gather((all_logits, all_labels), site="evaluate.predictions")
        all_logits = torch.cat([g[0] for g in gathered])
        all_labels = torch.cat([g[1] for g in gathered])
    both_classes = bool(all_labels.min() != all_labels.max())
    return {
        "auc": float(binary_auroc(torch.sigmoid(all_logits), all_labels.long())) if both_classes else None,
        "logloss": float(F.binary_cross_entropy_with_logits(all_logits, all_labels)),
    }


def _endless(loader: Iterable) -> Iterator:
    """Batches from the loader's current position on, epoch after epoch."""
    while True:
        yield from loader


def _announce(message: str, coordinator: Coordinator) -> None:
    """A line a person watching the run reads as it happens (rank 0 only, above the progress bar)."""
    if coordinator.is_coordinator:
        tqdm.write(message, file=sys.stderr)


@contextlib.contextmanager
def _unguarded_step() -> Iterator[StepOutcome]:
    """A step outside a supervised job: nothing heals it."""
    yield StepOutcome()


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ckpt: CPRCheckpointer,
    train_loader: Iterable,
    total_steps: int,
    schedule: FailureSchedule | None = None,
    eval_loader: Iterable | None = None,
    lr_decay: str = "linear",
    log_every: int = 50,
    eval_every: int = 0,
    metrics: MetricsLog | None = None,
    progress: bool = False,
    elastic: ElasticJob | None = None,
) -> LoopResult:
    """Train `model` from `ckpt.global_step` to `total_steps`, injecting the schedule's failures.

    `train_loader` is any re-iterable source of TorchRec `Batch`es (iterated again from where it stands after
    each pass, and after a full recovery), and must be the reader `ckpt` rewinds on full recovery. With `elastic` (a supervised job,
    whose `model`, `optimizer` and `ckpt` these are) a rank's real death drops the step in flight and heals
    the job: training goes on with the rebuilt model from the step the recovery chose. With `lr_decay="linear"` the
    optimizer's learning rates fall linearly to 0 over the run, as a function of the model's step, so full
    recovery retrains lost steps with the same rates.
    """
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {lr_decay!r}")
    if log_every < 1 or eval_every < 0:
        raise ValueError(f"log_every must be >= 1 and eval_every >= 0, got {log_every} and {eval_every}")
    coordinator = ckpt.coordinator
    metrics = metrics or MetricsLog(None)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    pending = [f for f in (schedule or FailureSchedule.empty()) if f.step > ckpt.global_step]
    batches = _endless(train_loader)
    bar = tqdm(total=total_steps, initial=ckpt.global_step, disable=not (progress and coordinator.is_coordinator),
               unit="step", dynamic_ncols=True)
    loss_sum, loss_count, samples = 0.0, 0, 0
    step_seconds = recovery_seconds = 0.0
    guarded_step = elastic.training_step if elastic is not None else _unguarded_step
    wall, furthest = WallClock(), ckpt.global_step  # steps up to `furthest` are trained again after a rollback
    started = time.perf_counter()
    while ckpt.global_step < total_steps:
        fetch_start = time.perf_counter()
        batch = next(batches)
        step_start = trained = time.perf_counter()
        persisting = ckpt.saves.persisting() is not None
        with guarded_step() as outcome:
            if lr_decay == "linear":
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * (1.0 - ckpt.global_step / total_steps)
            ckpt.observe(batch)
            optimizer.zero_grad()
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()
            trained = time.perf_counter()
            step_seconds += trained - step_start
            ckpt.step()
        for plan in ckpt.clock.take_events():
            metrics.write(plan)
        if outcome.healed:
            recovery_seconds += time.perf_counter() - step_start
            restore = sum(event.phases.get("restore") or 0.0 for event in outcome.recoveries)
            wall.add("restores", restore)
            wall.add("waiting", time.perf_counter() - fetch_start - restore)
            model, optimizer = elastic.model, elastic.optimizer
            for event in outcome.recoveries:
                metrics.write({"step": event.step, "event": "rank died", "rank": event.rank, "recovery": event.kind,
                               "resumed_at": event.resumed_at})
            batches = _endless(train_loader)  # the reader is where the recovery put it
            bar.n = ckpt.global_step
            continue
        wall.add("save_stalls", time.perf_counter() - trained)
        wall.add_step(trained - fetch_start, persisting, reexecuted=ckpt.global_step <= furthest)
        furthest = max(furthest, ckpt.global_step)
        samples += batch.labels.numel()
        loss_sum += float(loss.detach())
        loss_count += 1
        step = ckpt.global_step
        bar.update(1)
        while pending and pending[0].step <= step:
            failure = pending.pop(0)
            recovery_start = time.perf_counter()
            result = ckpt.recover([failure.domain])
            recovery_seconds += time.perf_counter() - recovery_start
            wall.add("restores", time.perf_counter() - recovery_start)
            event = {"step": step, "event": "failure", "shard": failure.domain, "recovery": result.kind,
                     "resumed_at": result.step}
            metrics.write(event)
            _announce(f"step {step}: shard {failure.domain} failed; {result.kind} recovery, training resumes at step "
                      f"{result.step}", coordinator)
            if result.kind == "full":
                batches = _endless(train_loader)  # the reader was rewound with the model
                bar.n = result.step
        if step % log_every == 0 or step == total_steps:
            rate = samples / step_seconds if step_seconds else 0.0
            metrics.write({"step": step, "train_loss": loss_sum / loss_count, "samples_per_s": rate})
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", samples_s=f"{rate:,.0f}")
            if coordinator.world_size > 1 and (not coordinator.is_coordinator or not progress):
                print(f"[rank {coordinator.rank}] step {step}/{total_steps} loss {loss_sum / loss_count:.4f} "
                      f"{rate:,.0f} samples/s", file=sys.stderr, flush=True)
            loss_sum, loss_count = 0.0, 0
        if eval_loader is not None and eval_every and step % eval_every == 0 and step < total_steps:
            eval_start = time.perf_counter()
            metrics.write({"step": step, **{f"eval_{k}": v for k, v in evaluate(model, eval_loader, coordinator).items()}})
            wall.add("evaluation", time.perf_counter() - eval_start)
    flush_start = time.perf_counter()
    ckpt.flush()  # the last save's write belongs to the run's time
    wall.add("save_stalls", time.perf_counter() - flush_start)
    bar.close()
    wall_seconds = time.perf_counter() - started
    final = evaluate(model, eval_loader, coordinator) if eval_loader is not None else {}
    metrics.write({"step": total_steps, **{f"eval_{k}": v for k, v in final.items()}})
    return LoopResult(
        eval=final,
        steps=total_steps,
        steps_executed=ckpt.ledger.steps_executed,
        samples=int(coordinator.sum(samples, site="loop.samples")),
        step_seconds=max(coordinator.all_gather(step_seconds, site="loop.step_seconds")),
        wall_seconds=max(coordinator.all_gather(wall_seconds, site="loop.wall_seconds")),
        recovery_seconds=max(coordinator.all_gather(recovery_seconds, site="loop.recovery_seconds")),
        wall_clock=wall.summary(wall_seconds),
    )
