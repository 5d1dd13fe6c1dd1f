"""Smoke tests of every experiment on tiny settings: each runs end to end through `cpr.train.run` and writes
its JSON, markdown table and figure; `write_results` turns them into a results page."""
from __future__ import annotations

import json
import math

import pytest

from experiments import (
    _common, access_skew, bytes_vs_pls, failure_injection, overhead, pls_target, pls_vs_accuracy, real_failures,
    write_results,
)


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(autouse=True)
def isolated_cache(results_root, monkeypatch):
    """Runs are cached per module (experiments sharing flags share runs), never in the checkout."""
    monkeypatch.setattr(_common, "CACHE", results_root / "cache")


def outputs(results_root, name: str) -> dict:
    folder = results_root / name
    assert (folder / f"{name}.png").stat().st_size > 0
    assert (folder / "results.md").read_text().startswith("| ")
    return json.loads((folder / "results.json").read_text())


def test_pls_vs_accuracy_writes_points_and_a_fit(results_root):
    pls_vs_accuracy.main(["--tiny", "--seeds", "0", "--policies", "partial", "--targets", "0", "0.1", "0.2",
                          "--out", str(results_root / "pls_vs_accuracy")])
    result = outputs(results_root, "pls_vs_accuracy")
    points = result["points"]
    assert {p["target_pls"] for p in points} == {0, 0.1, 0.2}
    assert set(points[0]) >= {"data", "policy", "seed", "target_pls", "pls_measured", "auc_loss"}
    full = [p for p in points if p["target_pls"] == 0]
    assert full and all(p["policy"] == "full" and p["pls_measured"] == 0 for p in full)
    assert result["fits"]["synthetic"]["n"] == len(points)


def test_bytes_vs_pls_reuses_the_sweep_runs(results_root, capsys):
    bytes_vs_pls.main(["--tiny", "--seeds", "0", "--policies", "partial", "--targets", "0.1", "0.2",
                       "--out", str(results_root / "bytes_vs_pls")])
    assert capsys.readouterr().out.count("cached") == 2  # the same flags as the accuracy sweep's runs
    groups = outputs(results_root, "bytes_vs_pls")["groups"]
    assert all(g["mb_per_hour"] > 0 for g in groups)


def test_pls_target_reports_measured_against_target(results_root):
    pls_target.main(["--tiny", "--seeds", "0", "--policies", "mfu", "--out", str(results_root / "pls_target")])
    group = outputs(results_root, "pls_target")["groups"][0]
    assert group["ratio_to_target"] == pytest.approx(group["pls_measured_mean"] / 0.02)
    assert group["measured_mean_age_steps"] > 0


def test_failure_injection_runs_with_an_exact_failure_count(results_root):
    # --failures used to reach the `none` baseline too, which cannot recover: the script crashed.
    failure_injection.main(["--tiny", "--seeds", "0", "--policies", "full", "partial", "--failures", "2",
                            "--out", str(results_root / "failure_injection")])
    runs = outputs(results_root, "failure_injection")["runs"]
    assert [r["failures"] for r in runs] == [2, 2]
    for r in runs:
        causes = r["save_fraction"] + r["load_fraction"] + r["lost_compute_fraction"] + r["reschedule_fraction"]
        assert math.isclose(causes, r["overhead_fraction"], rel_tol=1e-9)


def test_overhead_compares_emulated_points_with_the_model(results_root):
    overhead.main(["--tiny", "--seeds", "0", "--policies", "partial", "mfu", "--mtbf-hours", "400", "--shards", "4",
                   "--out", str(results_root / "overhead")])
    groups = outputs(results_root, "overhead")["groups"]
    assert {(g["axis"], g["policy"]) for g in groups} == {(a, p) for a in ("mtbf", "shards") for p in ("partial", "mfu")}
    assert all(g["model"] > 0 and g["overhead"] > 0 for g in groups)


def test_access_skew_ranks_rows_by_accesses(results_root):
    access_skew.main(["--tiny", "--seeds", "0", "--fractions", "0.05", "--sample-rates", "0.1",
                      "--out", str(results_root / "access_skew")])
    skew = outputs(results_root, "access_skew")["skew"][0]
    shares = [skew[f"top_{s:g}"] for s in access_skew.ROW_SHARES]
    assert shares == sorted(shares) and shares[1] > 0.01  # skewed: the top 1% of rows get more than 1%


def test_write_results_shows_every_figure(results_root, tmp_path):
    page = write_results.main(["--results", str(results_root), "--docs", str(tmp_path)]).read_text()
    for name, title, _ in write_results.SECTIONS:
        assert f"## {title}" in page
        if (results_root / name / "results.json").exists():
            assert f"(figures/{name}.png)" in page and (tmp_path / "figures" / f"{name}.png").exists()
    assert "## Closing note" in page


def test_real_failures_kills_ranks_of_a_supervised_job(results_root):
    results = real_failures.main(["--tiny", "--policies", "partial", "--out", str(results_root / "real_failures")])
    none, partial = results["runs"]
    assert (none["policy"], none["recoveries"]) == ("none", [])
    assert [r["kind"] for r in partial["recoveries"]] == ["partial", "partial"]
    assert all(r["survivor_bytes_read"] == 0 and r["bytes_read"] > 0 for r in partial["recoveries"])
    assert (results_root / "real_failures" / "real_failures.png").exists()


def test_write_results_only_rewrites_the_named_sections(tmp_path):
    """`--only NAME` replaces that experiment's section of an existing page (or adds it in order) and keeps
    every other section, the closing note included, as it was."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    (results / "goodput").mkdir(parents=True)
    docs.mkdir()
    (results / "goodput" / "results.json").write_text(json.dumps(
        {"figure": "goodput.png", "paper": "claim", "command": "cmd", "seeds": [0], "findings": ["new finding"]}))
    (results / "goodput" / "results.md").write_text("| way |\n|---|\n| x |\n\n- new finding\n")
    (results / "goodput" / "goodput.png").write_bytes(b"png")
    titles = {name: title for name, title, _ in write_results.SECTIONS}
    old = (f"# Results\n\nintro\n\n## {titles['overhead']}\n\nold overhead\n\n## {titles['real_failures']}\n\nkills\n\n"
           "## Closing note\n\nnote\n")
    (docs / "results.md").write_text(old)
    page = write_results.main(["--results", str(results), "--docs", str(docs), "--only", "goodput"]).read_text()
    assert "old overhead" in page and "kills" in page and page.rstrip().endswith("note") and "intro" in page
    assert page.index(titles["overhead"]) < page.index(titles["goodput"]) < page.index(titles["real_failures"])
    assert "new finding" in page and (docs / "figures" / "goodput.png").exists()
    again = write_results.main(["--results", str(results), "--docs", str(docs), "--only", "goodput"]).read_text()
    assert again == page
