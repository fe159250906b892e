"""``virtualst perf``: every row measures something finite, the table names every row and target.

Tiny sizes only, and no assertion on speed: the suite itself is the speed measurement.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from virtualst.bench import knn_speed, ridge_speed
from virtualst.bench.perf import ROWS, PerfConfig, format_table, head_fit_times, ridge_fit_flops, run_perf, select_rows
from virtualst.bench.predict_memory import in_child
from virtualst.cli import app
from virtualst.heads.ridge import ridge_loo

TINY = {
    "embed_repeats": 1,
    "ridge_spots": 300,
    "ridge_dims": 16,
    "ridge_genes": 5,
    "matmul_size": 128,
    "knn_references": 300,
    "knn_queries": 40,
    "knn_dims": 16,
    "knn_k": 5,
    "knn_repeats": 1,
    "memory_spots": 60,
    "memory_tile_px": 32,
    "heads_spots": 200,
    "heads_genes": 4,
    "heads_dims": 8,
    "heads_measured_genes": (("lgbm", 2),),
}


@pytest.fixture(scope="module")
def tiny_run(visium_dir):
    """Every row once at tiny sizes (row 1 on the 49-spot Visium sample)."""
    config = PerfConfig.quick(embed_samples=(visium_dir,), **TINY)
    return config, run_perf(config)


# ------------------------------------------------------------------ the FLOP count of row 3
def test_flop_count_matches_a_hand_count_with_more_spots_than_features():
    # n=10, p=3, t=2, A=2, intercept -> rank 3
    flops = ridge_fit_flops(10, 3, 2, 2)
    hand = {
        "gram": 10 * 3 * 4,  # 6 dot products of length 10
        "eigh": 14 * 27 / 3,
        "xty": 2 * 10 * 3 * 2,
        "u": 2 * 10 * 3 * 3,
        "q": 2 * 3 * 3 * 2,
        "leverage": 10 * 3 * (1 + 2 * 2),
        "loo_f32": 2 * 2 * (2 * 10 * 3 + 4 * 10 + 3),
        "coef": 2 * 3 * 3 * 2,
    }
    assert {k: v for k, v in flops.items() if k != "total"} == hand
    assert flops["total"] == sum(hand.values()) == 1180


def test_flop_count_matches_a_hand_count_with_more_features_than_spots():
    # n=4, p=6, t=1, A=1, intercept -> rank n - 1 = 3, Gram of the 4 spots
    flops = ridge_fit_flops(4, 6, 1, 1)
    hand = {"gram": 6 * 4 * 5, "eigh": 14 * 64 / 3, "q": 2 * 4 * 3, "v": 2 * 4 * 6 * 3, "leverage": 4 * 3 * 3}
    hand.update(loo_f32=2 * 4 * 3 + 16 + 3, coef=2 * 6 * 3)
    assert {k: v for k, v in flops.items() if k != "total"} == hand
    assert flops["total"] == pytest.approx(701 + 2 / 3)


def test_flop_count_of_a_pruned_fit_counts_the_scored_pairs_and_the_bounds():
    full, pruned = ridge_fit_flops(10, 3, 2, 2), ridge_fit_flops(10, 3, 2, 2, scored=3)
    assert pruned["loo_f32"] == 3 * (2 * 10 * 3 + 4 * 10 + 3) == full["loo_f32"] * 3 / 4
    assert pruned["bounds"] == (6 + 2 * 10) * 2 * 3 * 2 and "bounds" not in full  # all 10 spots' residuals exact
    assert pruned["total"] == full["total"] - full["loo_f32"] + pruned["loo_f32"] + pruned["bounds"]


def test_flop_count_matches_ridge_loo_own_count():
    rng = np.random.default_rng(0)
    result = ridge_loo(rng.normal(size=(300, 8)), rng.normal(size=(300, 5)), (1.0, 10.0, 1e3), backend="numpy")
    counted = ridge_fit_flops(300, 8, 5, 3, scored=int(result.scored.sum()))
    assert counted["loo_f32"] == result.flops["loo_f32"]
    assert counted["bounds"] == result.flops["bounds"]


@pytest.mark.parametrize("n, p, fit_intercept", [(40, 6, True), (5, 9, True), (5, 9, False)])
def test_flop_count_uses_the_rank_ridge_loo_keeps(n, p, fit_intercept):
    rng = np.random.default_rng(0)
    result = ridge_loo(rng.normal(size=(n, p)), rng.normal(size=(n, 2)), (1.0, 10.0), fit_intercept, backend="numpy")
    r = result.rank
    assert ridge_fit_flops(n, p, 2, 2, fit_intercept)["coef"] == 2 * p * r * 2


# ------------------------------------------------------------------ rows and table
def test_every_row_returns_a_finite_number(tiny_run):
    _, results = tiny_run
    assert [r.key for r in results] == ["1", "2", "3", "4", "5", "6"]
    for r in results:
        assert r.error is None, (r.key, r.error)
        assert math.isfinite(r.value) and r.value > 0, (r.key, r.value)
        assert r.passed in (True, False) if r.key != "6" else r.passed is None
        assert r.seconds > 0


def test_table_has_every_row_with_its_target_and_the_machine(tiny_run):
    _, results = tiny_run
    table = format_table(results, "test machine, 2 CPUs")
    lines = table.splitlines()
    assert lines[0] == "machine: test machine, 2 CPUs"
    body = [line for line in lines[2:] if line.startswith("|")]
    assert len(body) == 2 + len(ROWS)  # header, rule, one line per row
    assert len({len(line) for line in body}) == 1  # columns padded: plain text lines up too
    for row, line in zip(ROWS, body[2:]):
        assert line.startswith(f"| {row.key} ") and row.name in line
    assert ">= 0.9 (CPU)" in table or ">= 0.8 (GPU)" in table
    for target in (">= 5x", ">= 0.5", ">= 3x", "< 2 GB"):
        assert target in table


def test_rows_state_the_sizes_they_used(tiny_run):
    _, results = tiny_run
    detail = {r.key: r.detail for r in results}
    assert "300 spots x 16 dims x 5 genes, 17 alphas" in detail["2"]
    assert "GFLOP counted" in detail["3"] and "128^3" in detail["3"]
    assert "300 references x 16 dims, 40 queries, k 5" in detail["4"] and "cosine" in detail["4"] and "l2" in detail["4"]
    assert "(asked 60)" in detail["5"] and "32 px" in detail["5"]
    assert "4 genes on 200 spots x 8 dims" in detail["6"] and "lgbm" in detail["6"] and "EXTRAPOLATED linearly from 2 genes" in detail["6"]


def test_peak_rss_is_measured_in_a_child_and_plausible(tiny_run):
    _, results = tiny_run
    (memory,) = [r for r in results if r.key == "5"]
    # A fresh Python with torch and the encoder loaded: well above 50 MB, far below the machine.
    assert 0.05 < memory.value < 16
    assert memory.unit == "GB" and memory.passed == (memory.value < 2)


def test_child_peak_rss_is_not_inflated_by_the_caller():
    held = np.ones(50_000_000)  # 400 MB resident in this process while the child runs
    report = in_child(len, "abc")
    assert report["value"] == 3 and held[-1] == 1.0
    assert 0.001 < report["peak_rss_gb"] < 0.3


def test_head_fit_times_extrapolates_only_the_listed_heads():
    config = PerfConfig.quick(heads=("ridge", "lgbm"), heads_spots=120, heads_genes=6, heads_dims=8, heads_measured_genes=(("lgbm", 2),))
    ridge, lgbm = head_fit_times(config)
    assert (ridge["head"], ridge["genes"], ridge["extrapolated"]) == ("ridge", 6, False)
    assert ridge["all_genes_s"] == ridge["seconds"]
    assert (lgbm["head"], lgbm["genes"], lgbm["extrapolated"]) == ("lgbm", 2, True)
    assert lgbm["all_genes_s"] == pytest.approx(3 * lgbm["seconds"])


def test_rows_are_selected_by_key_or_name_in_table_order():
    assert [r.key for r in select_rows(["heads", "2", "gflops"])] == ["2", "3", "6"]
    with pytest.raises(ValueError, match="unknown perf row"):
        select_rows(["7"])


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path):
    config = PerfConfig.quick(rows=("1", "3"), embed_samples=(tmp_path / "missing",), **{k: v for k, v in TINY.items() if k.startswith("ridge")})
    failed, gflops = run_perf(config)
    assert failed.error and "missing" in failed.error and math.isnan(failed.value) and failed.passed is False
    assert gflops.error is None and math.isfinite(gflops.value)
    assert "failed" in format_table([failed, gflops], "m")


# ------------------------------------------------------------------ command line
def test_cli_perf_quick_writes_the_table_and_json(tmp_path):
    out = tmp_path / "perf.md"
    args = ["perf", "--quick", "--rows", "2,3", "--ridge-spots", "300", "--ridge-dims", "16", "--ridge-genes", "5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "machine: " in result.output and "| 2 " in result.output and "| 3 " in result.output and "| 4 " not in result.output
    assert sum(line.startswith("|") for line in out.read_text().splitlines()) == 4  # header, rule and two rows
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["key"] for r in data["results"]] == ["2", "3"] and data["config"]["ridge_spots"] == 300
    assert all(math.isfinite(r["value"]) for r in data["results"])


def test_cli_perf_unknown_row_is_a_one_line_error():
    result = CliRunner().invoke(app, ["perf", "--rows", "2,9"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: unknown perf row(s) 9")


# ------------------------------------------------------------------ the scripts perf reuses keep their command lines
def test_ridge_speed_script_still_reports(capsys):
    report = ridge_speed.main(["--spots", "200", "--dims", "8", "--genes", "3", "--backend", "numpy"])
    assert report["same_alpha"] == 1.0 and report["max_diff"] < 1e-6 and report["ratio"] > 0
    assert "speed ratio sklearn / ridge_loo" in capsys.readouterr().out


def test_knn_speed_script_still_reports(capsys):
    knn_speed.main(["--references", "200", "--queries", "20", "--dims", "8", "--k", "5", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "cosine: KNNHead" in out and "l2: KNNHead" in out
    rows = knn_speed.measure(200, 20, 8, 5, ("l2",), repeats=1, echo=None)
    assert rows[0]["metric"] == "l2" and rows[0]["identical"] == 1.0


@pytest.mark.parametrize(("data", "low", "high"), [("mixture", -0.2, 1.0), ("crowded", 0.7, 1.0), ("near-duplicates", 0.999, 1.0)])
def test_knn_speed_data_sets_have_their_cosine_spread(data, low, high):
    R, Q = knn_speed.DATASETS[data](300, 40, 64)
    assert R.shape == (300, 64) and Q.shape == (40, 64) and R.dtype == Q.dtype == np.float32
    cos = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (R / np.linalg.norm(R, axis=1, keepdims=True)).T
    assert low < np.median(cos) < high


#: A tiny knn_speed run (cosine only).
SMALL_KNN = ["--references", "200", "--queries", "20", "--dims", "8", "--k", "5", "--repeats", "1", "--metrics", "cosine"]


def test_knn_speed_reports_the_search_used(capsys, monkeypatch):
    from virtualst.heads import knn

    monkeypatch.setattr(knn, "bf16_screen_ok", lambda: True)
    knn_speed.main(SMALL_KNN)  # 200 references: below the screen's minimum
    floor = knn.SCREEN_MIN_REFERENCES
    monkeypatch.setattr(knn, "SCREEN_MIN_REFERENCES", 100)
    knn_speed.main(SMALL_KNN)
    knn_speed.main(["--no-screen", *SMALL_KNN])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cosine:")]
    assert ["search: IndexFlatIP" in lines[0], "search: BF16ScreenIndex" in lines[1], "search: IndexFlatIP" in lines[2]] == [True] * 3
    assert "candidates re-scored per query" in lines[1] and knn.SCREEN_MIN_REFERENCES == 100 != floor  # --no-screen restored it


def test_knn_speed_runs_other_data(capsys):
    knn_speed.main([*SMALL_KNN, "--data", "crowded"])
    out = capsys.readouterr().out
    assert out.startswith("crowded: references 200 x 8") and "search: IndexFlatIP" in out
