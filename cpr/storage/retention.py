"""Which save folders may go: retention counts only saves verified loadable, and nothing else deletes a save.

A folder is deleted only when `keep_last` full saves *verified loadable* (committed by this store, or read
back whole by a rollback or resume) are newer than it: an unreadable folder (a damaged commit record, another
`COMMIT_VERSION`) or one that was never read is never counted as one of the kept saves, so it cannot make the
saves a run commits look old. A save that must leave the folder's list without being deleted (one a fallback
skipped, one newer than the save a run went back to, one a commit of the same step replaces, an earlier run's
when a run starts fresh) is *set aside*: renamed `aside-save-<step>-<kind>-<unique>`, kept until retention
finds it superseded like any other folder.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .commit import _SAVE_NAME, SaveInfo
from .location import Folder

ASIDE_PREFIX = "aside-"
_ASIDE_NAME = re.compile(r"^aside-save-(\d{10})-(full|subset)-[0-9a-f]{8}$")


@dataclass(frozen=True)
class SaveFolder:
    """A save folder under its save name, or one set aside (`aside`), with the step and kind its name says."""

    path: Folder
    step: int
    kind: str
    aside: bool = False

    @property
    def key(self) -> tuple[int, str]:
        return self.step, self.kind


@dataclass(frozen=True)
class FolderListing:
    """What a checkpoint folder holds: the saves whose commit records verify, oldest first, and why each
    other save folder cannot be read (folder name -> reason)."""

    saves: list[SaveInfo]
    unreadable: dict[str, str]

    def describe(self) -> str:
        """One line: how many saves, and each unreadable folder with its reason (the first few)."""
        if not self.saves and not self.unreadable:
            return "no save folders"
        problems = "; ".join(f"{name}: {reason}" for name, reason in list(self.unreadable.items())[:3])
        more = f" (and {len(self.unreadable) - 3} more)" if len(self.unreadable) > 3 else ""
        newest = f", the newest at step {self.saves[-1].step}" if self.saves else ""
        return (f"{len(self.saves)} readable save(s){newest}, {len(self.unreadable)} unreadable"
                + (f": {problems}{more}" if problems else ""))


def list_folders(directory: Folder) -> list[SaveFolder]:
    """Every save folder and set-aside save in `directory`, by step; full before subset at the same step."""
    found = []
    for path in directory.iterdir():
        match = _SAVE_NAME.match(path.name) or _ASIDE_NAME.match(path.name)
        if match and path.is_dir():
            found.append(SaveFolder(path, int(match[1]), match[2], aside=path.name.startswith(ASIDE_PREFIX)))
    return sorted(found, key=lambda f: (f.step, f.kind != "full", f.aside, f.path.name))


def aside_name(folder: SaveFolder) -> str:
    """A new name for `folder` set aside: outside the save names, telling its step and kind."""
    return f"{ASIDE_PREFIX}{folder.path.name}-{uuid.uuid4().hex[:8]}"


def superseded(folders: Sequence[SaveFolder], verified: Collection[tuple[int, str]], keep_last: int) -> list[SaveFolder]:
    """The folders retention deletes: those older than the oldest of the newest `keep_last` verified full
    saves (subsets at its step too: a subset is a delta on a full save below it). With fewer verified full
    saves than that, only subsets older than every full save (nothing to compose them on) go."""
    verified_fulls = [f for f in folders if not f.aside and f.kind == "full" and f.key in verified]
    if len(verified_fulls) >= keep_last:
        threshold = verified_fulls[-keep_last].step
        return [f for f in folders if f.step < threshold or (f.step == threshold and f.kind == "subset")]
    fulls = [f.step for f in folders if f.kind == "full"]
    if not fulls:
        return []  # subsets without a full save below them are kept: nothing supersedes them yet
    return [f for f in folders if f.kind == "subset" and f.step <= min(fulls)]
