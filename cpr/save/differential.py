"""Differential saves (Check-N-Run's incremental checkpoints): a periodic full save written as a subset save
of the rows changed since their last save, for any partial-recovery policy.

The bound: restoring a domain reads its part of the newest full save and of every subset save after it (the
policy's own subsets too). A differential is written only while, for every domain, those subsets' bytes
plus the differential's stay within the domain's part of the full save, so a restore reads at most twice a
full save; otherwise the save is a real full one, which starts a new chain. Differential saves rely on a row
changing only when it is looked up: true of TorchRec's fused sparse optimizers, not of a dense optimizer with
momentum (such as Adam) stepping rows it did not look up.
"""
from __future__ import annotations

import dataclasses

import torch

from cpr.comm import Coordinator
from cpr.domains import DomainLayout
from cpr.policies.base import SaveDecision
from cpr.storage import CheckpointStore, domain_part
from cpr.tracking import AccessTracker

from .parts import PartMaker


class Differential:
    """Rewrites a policy's periodic full saves as differential ones (`SavePipeline`'s `rewrite`); collective.

    It is asked once the saves in flight have committed, since the chain it bounds is the folder's.
    """

    def __init__(self, store: CheckpointStore, tracker: AccessTracker, layout: DomainLayout, parts: PartMaker,
                 coordinator: Coordinator) -> None:
        self.store, self.tracker, self.layout, self.parts, self.coordinator = store, tracker, layout, parts, coordinator

    def __call__(self, decision: SaveDecision) -> SaveDecision:
        """The save to write for `decision`: a full one becomes the subset of the rows changed since their last
        save (the tracker's dirty rows), unless the chain since the last real full save has grown too long."""
        if decision.kind != "full":
            return decision
        saves = self.store.saves()
        fulls = [s for s in saves if s.kind == "full"]
        if not fulls:
            return decision
        chain = [s for s in saves if s.kind == "subset" and s.step > fulls[-1].step]
        rows: dict[str, list[torch.Tensor]] = {}
        new_bytes: dict[str, int] = {}
        for domain in self.layout.local:
            new_bytes[domain_part(domain)] = 0
            for table, held in self.layout.held(domain).items():
                ids = self.tracker.dirty_rows(table, held)
                rows.setdefault(table, []).append(ids)
                new_bytes[domain_part(domain)] += ids.numel() * self.parts.subset_row_bytes(table)
        every_domain = {part: n for gathered in self.coordinator.all_gather(new_bytes, site="save.differential_sizes")
                        for part, n in gathered.items()}
        for part, n in every_domain.items():
            chain_bytes = sum(s.parts[part].nbytes for s in chain if part in s.parts)
            if part in fulls[-1].parts and chain_bytes + n > fulls[-1].parts[part].nbytes:
                return dataclasses.replace(decision, reason=f"{decision.reason}; a full save ends the differential "
                                           f"chain since step {fulls[-1].step}")
        dirty = {table: torch.cat(ids) for table, ids in rows.items()}
        return SaveDecision("subset", rows={t: ids for t, ids in dirty.items() if ids.numel()},
                            reason=f"differential: {decision.reason}", differential=True)
