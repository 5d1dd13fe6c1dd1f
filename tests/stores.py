"""A checkpoint store with hooks, the seam through which tests make writes and commits wait or fail.

A checkpointer saves through the store it is given (`CPRCheckpointer(model, optimizer, store, ...)`), so a
test injects disk faults, slow disks or kills by passing one of these instead of a folder.
"""
from __future__ import annotations

import errno
from typing import Any, Callable

from cpr.storage import CheckpointStore

# Called with the part's (staging, part, step, kind) before it is written, or the save's (staging, step,
# kind) before it commits, or a committed save's (SaveInfo, part) before a read of that part; it may wait,
# raise (an OSError is a disk fault) or kill the process.
WriteHook = Callable[..., None]


class HookedStore(CheckpointStore):
    """`CheckpointStore` calling `before_write` before each part it writes, `before_commit` before each
    commit and `before_read` before each read of a part (set them at construction or later: a hook may need
    the checkpointer built on this store)."""

    def __init__(self, *args: Any, before_write: WriteHook | None = None, before_commit: WriteHook | None = None,
                 before_read: WriteHook | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_write, self.before_commit, self.before_read = before_write, before_commit, before_read

    def write_part(self, staging, part, step, kind, policy, content):
        if self.before_write is not None:
            self.before_write(staging, part, step, kind)
        return super().write_part(staging, part, step, kind, policy, content)

    def commit(self, staging, step, kind, *args, **kwargs):
        if self.before_commit is not None:
            self.before_commit(staging, step, kind)
        return super().commit(staging, step, kind, *args, **kwargs)

    def read_part(self, save, part, names=None):
        if self.before_read is not None:
            self.before_read(save, part)
        return super().read_part(save, part, names)


def eio_reads(*targets: tuple[int, str], times: int = 1) -> WriteHook:
    """A `before_read` hook: the first `times` reads of each (step, part) in `targets` fail with EIO."""
    left = {target: times for target in targets}

    def hook(save, part):
        if left.get((save.step, part), 0) > 0:
            left[(save.step, part)] -= 1
            raise OSError(errno.EIO, f"Input/output error (injected) reading {part} of step {save.step}")

    return hook
