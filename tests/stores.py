"""A checkpoint store with hooks, the seam through which tests make writes and commits wait or fail.

A checkpointer saves through the store it is given (`CPRCheckpointer(model, optimizer, store, ...)`), so a
test injects disk faults, slow disks or kills by passing one of these instead of a folder.
"""
from __future__ import annotations

from typing import Any, Callable

from cpr.storage import CheckpointStore

# Called with the part's (staging, part, step, kind) before it is written, or the save's (staging, step,
# kind) before it commits; it may wait, raise (an OSError is a disk fault) or kill the process.
WriteHook = Callable[..., None]


class HookedStore(CheckpointStore):
    """`CheckpointStore` calling `before_write` before each part it writes and `before_commit` before each
    commit (set them at construction or later: a hook may need the checkpointer built on this store)."""

    def __init__(self, *args: Any, before_write: WriteHook | None = None, before_commit: WriteHook | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_write, self.before_commit = before_write, before_commit

    def write_part(self, staging, part, step, kind, policy, content):
        if self.before_write is not None:
            self.before_write(staging, part, step, kind)
        return super().write_part(staging, part, step, kind, policy, content)

    def commit(self, staging, step, kind, *args, **kwargs):
        if self.before_commit is not None:
            self.before_commit(staging, step, kind)
        return super().commit(staging, step, kind, *args, **kwargs)
