"""Fixtures shared by the test modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_CRITEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo"


@pytest.fixture(scope="session")
def process_group() -> None:
    """One gloo process group (world size 1) for every test that builds a DMP model."""
    from dlrm.model import ensure_process_group

    ensure_process_group(torch.device("cpu"))


@pytest.fixture
def criteo_dir() -> Path:
    if not (SHARED_CRITEO / "kaggle_train_sample.tsv").exists():
        pytest.skip(f"real Criteo rows absent: {SHARED_CRITEO} (the shared data folder beside the repo)")
    return SHARED_CRITEO


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the synthetic-data cache of every test inside pytest's temporary folders, shared per session."""
    monkeypatch.setenv("CPR_CACHE", str(tmp_path_factory.getbasetemp() / "cpr-cache"))
