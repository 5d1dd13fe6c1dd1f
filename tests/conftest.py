"""Fixtures shared by the test modules."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so a CI result is reproducible; set
# HYPOTHESIS_PROFILE=explore to search new ones (a random seed each run).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

SHARED_CRITEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo"
# The tables of the small DLRM that checkpointer and policy tests train.
FEATURES = ["cat_0", "cat_1", "cat_2"]
ROWS = [64, 200, 7]


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


@pytest.fixture
def dmp_model(process_group):
    """A small DLRM through DMP (fused row-wise Adagrad) and its combined optimizer."""
    from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, wrap_dmp

    torch.manual_seed(0)
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], ROWS, FEATURES), torch.device("cpu"), "rowwise_adagrad", 0.1)
    return model, build_optimizer(model, 0.1)
