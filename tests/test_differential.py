"""Differential saves: a periodic full save written as the rows changed since their last save; restoring from
a full save plus the chain equals the live rows, and the chain stays within twice a full save."""
from __future__ import annotations

import pytest
import torch

from cpr import CPRCheckpointer
from cpr.storage import DENSE_PART
from cpr.train import main
from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, wrap_dmp
from tests.conftest import FEATURES
from tests.test_checkpointer import make_batch, snapshot, train_step

BIG = [3000, 5000, 400]  # few rows change per interval: the chain stays short


def _job(process_group, tmp_path, rows: list[int], policy: str = "partial", **kwargs):
    torch.manual_seed(0)
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], rows, FEATURES), torch.device("cpu"), "rowwise_adagrad", 0.1)
    optimizer = build_optimizer(model, 0.1)
    ckpt = CPRCheckpointer(model, optimizer, tmp_path / "ckpt", policy=policy, num_domains=3, total_steps=1000,
                           differential=True, **kwargs)
    return model, optimizer, ckpt


def _chain_ratio(ckpt: CPRCheckpointer) -> float:
    """The most any domain's restore reads (its part of the newest full save and of every later subset save)
    over its part of that full save."""
    ckpt.flush()
    saves = ckpt.store.saves()
    full = [s for s in saves if s.kind == "full"][-1]
    later = [s for s in saves if s.kind == "subset" and s.step > full.step]
    return max((record.nbytes + sum(s.parts[part].nbytes for s in later if part in s.parts)) / record.nbytes
               for part, record in full.parts.items() if part != DENSE_PART)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_full_save_plus_its_differential_chain_restores_the_live_rows(process_group, tmp_path, quantize):
    model, optimizer, ckpt = _job(process_group, tmp_path, BIG, interval_steps=4, quantize=quantize)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):  # periodic saves at steps 4, 8, ..., 20, the last one right now
        train_step(model, optimizer, ckpt, make_batch(gen, rows=BIG))
    ckpt.flush()  # the step-20 save is written in the background
    saves = ckpt.store.saves()
    assert [(s.step, s.kind) for s in saves] == [(0, "full")] + [(step, "subset") for step in (4, 8, 12, 16, 20)]
    assert all(s.extra["reason"].startswith("differential") for s in saves[1:])
    full_bytes = saves[0].nbytes
    assert all(s.nbytes < full_bytes / 5 for s in saves[1:])  # only the rows the 4 steps looked up
    live = snapshot(ckpt)
    with torch.no_grad():  # every domain fails: all rows must come back from the chain
        for table in ckpt.tables.tables:
            ckpt.tables.weight(table).normal_()
            for state in ckpt.tables.row_states(table).values():
                state.fill_(7.0)
    ckpt.recover([0, 1, 2])
    restored = snapshot(ckpt)
    for name, value in live.items():
        if quantize == "none" or not name.endswith("/weight"):
            assert torch.equal(restored[name], value), name
        else:  # quantized rows: within half a step of each row's range (8 bits)
            step = (value.max(dim=1).values - value.min(dim=1).values) / 255
            assert bool(((restored[name] - value).abs() <= step[:, None] / 2 * (1 + 1e-5) + 1e-7).all()), name
    report = ckpt.report()
    assert all(f["lost_updates"] == 0 for f in report["failures"])  # the newest save is the live state


def test_a_restore_never_reads_more_than_twice_a_full_save(process_group, tmp_path):
    rows = [64, 200, 7]  # small tables: most rows change every interval, so the chain fills up fast
    model, optimizer, ckpt = _job(process_group, tmp_path, rows, interval_steps=2)
    gen = torch.Generator().manual_seed(2)
    kinds = []
    # A full save's tensors carry their torch.save frames (DCP format), so the chain takes a while to fill.
    for _ in range(100):
        train_step(model, optimizer, ckpt, make_batch(gen, rows=rows))
        assert _chain_ratio(ckpt) <= 2.0
        newest = ckpt.store.saves()[-1]
        if newest.step == ckpt.global_step:
            kinds.append(newest.kind)
    assert len(kinds) == 50  # a save every 2 steps, as the policy planned: a differential counts as its full save
    assert "subset" in kinds and kinds.count("full") >= 2  # the bound forced real full saves between chains


def test_mfu_with_differential_saves_keeps_its_plan(process_group, tmp_path):
    model, optimizer, ckpt = _job(process_group, tmp_path, BIG, policy="mfu", interval_steps=10,
                                  policy_options={"subset_interval_steps": 5, "fraction": 0.05})
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        train_step(model, optimizer, ckpt, make_batch(gen, rows=BIG))
    ckpt.flush()  # the step-30 save is written in the background
    reasons = {s.step: s.extra["reason"] for s in ckpt.store.saves()}
    assert sorted(reasons) == [0, 10, 15, 20, 25, 30]  # subsets start once the plan is made (step 10)
    assert [step for step, why in reasons.items() if why.startswith("differential")] == [10, 20, 30]


def test_differential_needs_a_partial_recovery_policy(process_group, tmp_path, capsys):
    with pytest.raises(ValueError, match="differential saves need a partial-recovery policy, not 'full'"):
        _job(process_group, tmp_path, [64, 200, 7], policy="full")
    assert main(["--policy", "full", "--differential", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--differential needs a partial-recovery policy" in err and "Traceback" not in err
