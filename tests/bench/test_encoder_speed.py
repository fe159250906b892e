"""The encoder speed benchmark runs end to end on a tiny generated slide (no timing assertions)."""

from __future__ import annotations

import math

import numpy as np

from virtualst.bench.encoder_speed import generated_sample, main


def test_generated_sample_is_a_visium_grid_on_the_slide_tissue(tmp_path):
    sample = generated_sample(tmp_path, spots=40)
    assert 30 <= sample.n_spots <= 60 and sample.barcodes.size == len(set(sample.barcodes))
    assert sample.image.mpp == 0.5
    d = np.diff(np.sort(sample.centers[:, 0]))
    assert math.isclose(d[d > 1].min(), 100.0, rel_tol=1e-6)  # Visium: columns 50 µm = 100 px apart at 0.5 µm/px


def test_report_on_cpu(capsys):
    result = main(["--spots", "24", "--device", "cpu", "--batch-size", "8", "--no-peak"])
    out = capsys.readouterr().out
    assert {"model-only", "pipeline", "ratio", "FLOPs"} <= {line.split()[0] for line in out.splitlines()}
    assert result["tiles"] > 10 and result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["model_tiles_per_s"] > 0 and result["pipeline_tiles_per_s"] > 0
    assert math.isclose(result["ratio"], result["pipeline_tiles_per_s"] / result["model_tiles_per_s"])
    assert math.isclose(result["gflops_per_tile"], 0.77, rel_tol=0.02)
    assert result["vendor_peak_tflops"] is None and result["measured_peak_tflops"] is None
