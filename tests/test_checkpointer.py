"""Properties of CPRCheckpointer: what partial and full recovery restore, PLS accounting, crash safety."""
from __future__ import annotations

import statistics

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from cpr import CPRCheckpointer, ClusterProfile
from cpr.errors import RecoveryError
from cpr.faults import FailureSchedule
from tests.conftest import FEATURES, ROWS


def make_batch(gen: torch.Generator, batch_size: int = 32, rows: list[int] = ROWS) -> Batch:
    ids = []
    for r in rows:
        # Zipf-like skew: a few rows take most lookups, as in click logs; a fixed permutation scatters the
        # hot rows over the row range, as hashing does with real ids.
        weights = 1.0 / torch.arange(1, r + 1, dtype=torch.float64)
        scatter = torch.randperm(r, generator=torch.Generator().manual_seed(r))
        ids.append(scatter[torch.multinomial(weights, batch_size, replacement=True, generator=gen)])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES[: len(rows)], values=torch.cat(ids), lengths=torch.ones(batch_size * len(rows), dtype=torch.int32)
    )
    return Batch(
        dense_features=torch.rand(batch_size, 13, generator=gen),
        sparse_features=kjt,
        labels=torch.randint(0, 2, (batch_size,), generator=gen).float(),
    )


def plain_ebc(rows: list[int], dim: int = 2) -> tuple[EmbeddingBagCollection, torch.optim.Optimizer]:
    """A plain (unsharded) EBC over FEATURES with `rows` per table, stepped by torch's Adagrad."""
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=r, feature_names=[f])
        for i, (f, r) in enumerate(zip(FEATURES, rows))
    ])
    return ebc, torch.optim.Adagrad(ebc.parameters(), lr=0.1)


def emulate(policy: str, seed: int, tmp_path, options: dict, interval_steps: int = 80, steps: int = 600,
            failures: int = 24) -> dict:
    """Observe-and-recover emulation on a plain EBC: lost updates are counted, no training needed."""
    rows = [500, 300, 50]
    ebc, optimizer = plain_ebc(rows)
    ckpt = CPRCheckpointer(ebc, optimizer, tmp_path / f"{policy}{seed}", policy=policy, num_domains=8, total_steps=steps,
                           interval_steps=interval_steps, policy_options=options)
    pending = list(FailureSchedule.from_profile(ckpt.profile, steps, seed=seed, count=failures))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ckpt.observe(make_batch(gen, 16, rows))
        ckpt.step()
        while pending and pending[0].step <= ckpt.global_step:
            ckpt.recover([pending.pop(0).domain])
    return ckpt.report()


def train_step(model, optimizer, ckpt: CPRCheckpointer, batch: Batch) -> None:
    ckpt.observe(batch)
    optimizer.zero_grad()
    loss, _ = model(batch)
    loss.backward()
    optimizer.step()
    ckpt.step()


def snapshot(ckpt: CPRCheckpointer) -> dict[str, torch.Tensor]:
    out = {}
    for table in ckpt.tables.tables:
        out[f"{table}/weight"] = ckpt.tables.weight(table).clone()
        for name, value in ckpt.tables.row_states(table).items():
            out[f"{table}/{name}"] = value.clone()
    return out


def dense_params(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "embedding_bags" not in k}


def test_partial_recovery_restores_only_the_failed_shard(dmp_model, tmp_path):
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path, policy="partial", num_domains=4, total_steps=100, interval_steps=5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        train_step(model, optimizer, ckpt, make_batch(gen))
    saved = snapshot(ckpt)  # step 5: the policy just saved
    for _ in range(3):
        train_step(model, optimizer, ckpt, make_batch(gen))
    before = snapshot(ckpt)
    dense_before = dense_params(model)
    pending = {t: ckpt.tracker.counts(t).clone() for t in ckpt.tables.tables}

    result = ckpt.recover(failed_domains=[2])

    assert result.kind == "partial" and result.step == 8
    after = snapshot(ckpt)
    lost = 0
    for table in ckpt.tables.tables:
        start, end = ckpt.layout.rows(table, 2)
        inside = torch.zeros(ckpt.tables.tables[table].local_rows, dtype=torch.bool)
        inside[start:end] = True
        for key in [k for k in after if k.startswith(f"{table}/")]:
            assert torch.equal(after[key][~inside], before[key][~inside]), f"{key}: rows outside shard 2 changed"
            assert torch.equal(after[key][inside], saved[key][inside]), f"{key}: shard 2 rows are not the saved ones"
        changed = (before[f"{table}/weight"][inside] != saved[f"{table}/weight"][inside]).any(dim=1)
        assert changed.any() or end - start <= 1, "the test should exercise rows that moved since the save"
        lost += int(pending[table][start:end].sum())
    for key, value in dense_params(model).items():
        assert torch.equal(value, dense_before[key]), f"dense {key} changed"
    assert result.failures[0].lost_updates == lost > 0
    assert ckpt.report()["pls_measured"] == pytest.approx(lost / (8 * 32 * len(ROWS)))


def test_partial_recovery_composes_subset_saves(dmp_model, tmp_path):
    """Rows saved by a later subset save come back in that newer version."""
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path, policy="partial", num_domains=2, total_steps=100, interval_steps=50)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        train_step(model, optimizer, ckpt, make_batch(gen))
    table = next(iter(ckpt.tables.tables))
    start, end = ckpt.layout.rows(table, 0)
    hot = ckpt.tracker.hottest(table, k=3, row_range=(start, end))
    from cpr.policies import SaveDecision

    ckpt.save_now(SaveDecision("subset", rows={table: hot}))
    subset_version = ckpt.tables.weight(table)[hot].clone()
    for _ in range(2):
        train_step(model, optimizer, ckpt, make_batch(gen))
    ckpt.recover([0])
    assert torch.equal(ckpt.tables.weight(table)[hot], subset_version)
    others = torch.ones(end - start, dtype=torch.bool)
    others[hot - start] = False
    initial = ckpt.store.load_part(ckpt.store.saves(kind="full")[0], "domain-00000").tensors[f"emb/{table}/weight"]
    assert torch.equal(ckpt.tables.weight(table)[start:end][others], initial[others])


def test_full_recovery_rewinds_everything(dmp_model, tmp_path):
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path, policy="full", num_domains=4, total_steps=100, interval_steps=4)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        train_step(model, optimizer, ckpt, make_batch(gen))
    saved_rows, saved_dense = snapshot(ckpt), dense_params(model)
    for _ in range(3):
        train_step(model, optimizer, ckpt, make_batch(gen))
    result = ckpt.recover([1])
    assert result.kind == "full" and result.step == 4 == ckpt.global_step
    assert result.failures[0].lost_steps == 3
    for key, value in snapshot(ckpt).items():
        assert torch.equal(value, saved_rows[key]), key
    for key, value in dense_params(model).items():
        assert torch.equal(value, saved_dense[key]), key
    assert ckpt.report()["overhead"]["lost_compute"] == pytest.approx(3 * ckpt.hours_per_step)


def test_full_recovery_skips_a_corrupt_save(dmp_model, tmp_path):
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path, policy="full", num_domains=2, total_steps=100, interval_steps=2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        train_step(model, optimizer, ckpt, make_batch(gen))
    good = snapshot(ckpt)
    for _ in range(2):
        train_step(model, optimizer, ckpt, make_batch(gen))
    ckpt.flush()  # the step-4 save is written in the background: wait for its commit
    newest = ckpt.store.saves(kind="full")[-1]
    part = ckpt.store.load_part(newest, "domain-00000").manifest
    weight_file = part.folder / part.entry(f"emb/{next(iter(ckpt.tables.tables))}/weight").file
    data = bytearray(weight_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weight_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        result = ckpt.recover([0])
    assert result.step == 2
    for key, value in snapshot(ckpt).items():
        assert torch.equal(value, good[key]), key


def test_policy_none_cannot_recover(dmp_model, tmp_path):
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path, policy="none", total_steps=10)
    with pytest.raises(RecoveryError, match="keeps no checkpoint"):
        ckpt.recover([0])
    assert ckpt.store.saves() == []


def test_invalid_shard_is_rejected(dmp_model, tmp_path):
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path, policy="partial", num_domains=4, total_steps=10)
    with pytest.raises(ValueError, match="shard 4 does not exist"):
        ckpt.recover([4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_pls": 0.0}, "target_pls"),
        ({"num_domains": 0}, "num_domains"),
        ({"profile": "bad-mtbf"}, "mtbf_hours"),
    ],
)
def test_invalid_settings_fail_before_training(dmp_model, tmp_path, kwargs, message):
    model, optimizer = dmp_model
    if kwargs.get("profile") == "bad-mtbf":
        with pytest.raises(ValueError, match=message):
            ClusterProfile(job_hours=10, mtbf_hours=0, save_seconds=1, load_seconds=1)
        return
    with pytest.raises(ValueError, match=message):
        CPRCheckpointer(model, optimizer, tmp_path, policy="partial", total_steps=10, **kwargs)


def test_unwritable_directory_is_reported(dmp_model, tmp_path):
    model, optimizer = dmp_model
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=str(blocker)):
        CPRCheckpointer(model, optimizer, blocker / "ckpt", policy="partial", total_steps=10)


def test_plain_ebc_module_is_supported(tmp_path):
    ebc, optimizer = plain_ebc(ROWS, dim=4)
    ckpt = CPRCheckpointer(ebc, optimizer, tmp_path, policy="partial", num_domains=2, total_steps=10, interval_steps=100)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        batch = make_batch(gen)
        ckpt.observe(batch)
        optimizer.zero_grad()
        sum(v.sum() for v in ebc(batch.sparse_features).to_dict().values()).backward()
        optimizer.step()
        ckpt.step()
    assert set(ckpt.tables.row_states("t1")) == {"sum"}
    initial = ckpt.store.load_part(ckpt.store.saves()[0], "domain-00001").tensors
    ckpt.recover([1])
    start, end = ckpt.layout.rows("t1", 1)
    assert torch.equal(ckpt.tables.weight("t1")[start:end], initial["emb/t1/weight"])
    assert torch.equal(ckpt.tables.row_states("t1")["sum"][start:end], initial["emb/t1/opt/sum"])


def test_measured_pls_matches_the_analytic_expectation(tmp_path):
    """Averaged over 6 seeds (144 failures), measured PLS is within 20% of failures * L / (N steps), L the
    mean steps a failure finds its shard past the save: failures fall on step ends, 0 .. T-1 steps after a
    save, (T - 1) / 2 on average when T divides the run, and a failure at step 0 moves to step 1."""
    reports = [emulate("partial", seed, tmp_path, {}, interval_steps=40) for seed in range(6)]
    measured = statistics.mean(r["pls_measured"] for r in reports)
    expected = statistics.mean(r["pls_expected"] for r in reports)
    lost_steps = ((600 // 40) * 40 * (40 - 1) / 2 + 1) / 600
    assert expected == pytest.approx(24 * lost_steps / (8 * 600))
    assert measured == pytest.approx(expected, rel=0.2)


def test_checkpointer_is_stateful_for_torch_distributed_checkpoint(dmp_model, tmp_path):
    """dcp.save/dcp.load of {"cpr": ckpt} bring back rows, optimizer state, dense model and step."""
    import torch.distributed.checkpoint as dcp

    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path / "cpr", policy="partial", num_domains=2, total_steps=100, interval_steps=50)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        train_step(model, optimizer, ckpt, make_batch(gen))
    rows, dense_state = snapshot(ckpt), dense_params(model)
    dcp.save({"cpr": ckpt}, checkpoint_id=str(tmp_path / "dcp"))
    for _ in range(2):
        train_step(model, optimizer, ckpt, make_batch(gen))
    assert ckpt.global_step == 5
    dcp.load({"cpr": ckpt}, checkpoint_id=str(tmp_path / "dcp"))
    assert ckpt.global_step == 3
    for key, value in snapshot(ckpt).items():
        assert torch.equal(value, rows[key]), key
    for key, value in dense_params(model).items():
        assert torch.equal(value, dense_state[key]), key


def _adam_job(tmp_path, name: str):
    ebc, _ = plain_ebc([40, 30, 20])
    optimizer = torch.optim.Adam(ebc.parameters(), lr=0.05)  # creates its state lazily, at the first step
    ckpt = CPRCheckpointer(ebc, optimizer, tmp_path / name, policy="partial", num_domains=2, total_steps=50,
                           interval_steps=25)
    return ebc, optimizer, ckpt


def ebc_step(ebc, optimizer, ckpt, batch) -> None:
    """One training step of a plain EBC (sum of the pooled embeddings as the loss), seen by `ckpt`."""
    ckpt.observe(batch)
    optimizer.zero_grad()
    sum(v.sum() for v in ebc(batch.sparse_features).to_dict().values()).backward()
    optimizer.step()
    ckpt.step()


def test_an_optimizer_with_lazily_created_state_recovers_right_after_the_start(tmp_path):
    ebc, optimizer, ckpt = _adam_job(tmp_path, "adam")
    assert set(ckpt.tables.row_states("t0")) == {"exp_avg", "exp_avg_sq"}  # in the initial save already
    initial = ckpt.store.load_part(ckpt.store.saves()[0], "domain-00001").tensors
    gen = torch.Generator().manual_seed(8)
    for _ in range(2):
        ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=[40, 30, 20]))
    ckpt.recover([1])
    start, end = ckpt.layout.rows("t0", 1)
    assert torch.equal(ckpt.tables.weight("t0")[start:end], initial["emb/t0/weight"])
    assert torch.equal(ckpt.tables.row_states("t0")["exp_avg_sq"][start:end], initial["emb/t0/opt/exp_avg_sq"])


def test_stateful_round_trip_keeps_a_lazily_created_optimizer_state(tmp_path):
    import torch.distributed.checkpoint as dcp

    ebc, optimizer, ckpt = _adam_job(tmp_path, "a")
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=[40, 30, 20]))
    dcp.save({"cpr": ckpt}, checkpoint_id=str(tmp_path / "dcp"))
    saved = {id_: {k: v.clone() for k, v in state.items()} for id_, state in enumerate(optimizer.state.values())}

    fresh_ebc, fresh_optimizer, fresh = _adam_job(tmp_path, "b")  # a new process would start like this
    dcp.load({"cpr": fresh}, checkpoint_id=str(tmp_path / "dcp"))
    loaded = list(fresh_optimizer.state.values())
    assert len(loaded) == len(saved) == 3
    for i, state in enumerate(loaded):
        for key, value in saved[i].items():
            assert torch.equal(state[key], value), (i, key)
    assert fresh.global_step == 3


def test_a_save_the_disk_refuses_is_reported_and_training_goes_on(dmp_model, tmp_path, capsys):
    import errno

    from tests.stores import HookedStore

    def disk_full_at_step_2(staging, part, step, kind):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, HookedStore(tmp_path, before_write=disk_full_at_step_2), policy="full",
                           num_domains=2, total_steps=100, interval_steps=2)
    gen = torch.Generator().manual_seed(10)
    for _ in range(4):
        train_step(model, optimizer, ckpt, make_batch(gen))
    assert "step-2 full save failed" in capsys.readouterr().err
    report = ckpt.report()
    assert [(f["step"], f["kind"]) for f in report["failed_saves"]] == [(2, "full")]
    assert [s.step for s in ckpt.store.saves()] == [0, 4]  # the next save went through
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert ckpt.recover([0]).step == 4


def test_a_new_run_does_not_mix_with_an_earlier_runs_saves(tmp_path):
    from cpr.errors import EarlierRunError

    ebc, optimizer = plain_ebc(ROWS)
    first = CPRCheckpointer(ebc, optimizer, tmp_path, policy="full", num_domains=2, total_steps=10, interval_steps=2)
    gen = torch.Generator().manual_seed(11)
    for _ in range(4):
        first.observe(make_batch(gen))
        first.step()
    first.close()
    with pytest.raises(EarlierRunError, match="step 4"):
        CPRCheckpointer(ebc, optimizer, tmp_path, policy="full", num_domains=2, total_steps=10, interval_steps=2)
    again = CPRCheckpointer(ebc, optimizer, tmp_path, policy="full", num_domains=2, total_steps=10, interval_steps=2,
                            overwrite=True)
    assert [s.step for s in again.store.saves()] == [0]  # only the new run's initial save


def test_a_save_is_charged_for_its_data_not_its_file_formats_headers(tmp_path):
    """The emulated cost of a full save is the profile's save time: a torch.save record per tensor adds about
    1.5 KB, which for tiny tables in 16 domains is most of the file, and must not multiply the charge."""
    ebc, optimizer = plain_ebc([64, 48, 32])
    ckpt = CPRCheckpointer(ebc, optimizer, tmp_path, policy="full", num_domains=16, total_steps=100, interval_steps=10)
    (event,) = ckpt.ledger.checkpoints
    assert event.bytes > 10 * event.data_bytes  # the format's headers dwarf these rows
    assert event.data_bytes == ckpt.ledger.full_bytes  # every row, row-wise state and dense tensor, once
    assert ckpt.ledger.overhead.save == pytest.approx(ckpt.ledger.save_hours_full)
    assert ckpt.store.saves()[0].extra["data_bytes"] == event.data_bytes  # kept for a resumed run's record
    ckpt.close()
