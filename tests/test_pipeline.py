"""The main job: stage 1, stage 2 and the MSE control, then the comparison PNG; reruns resume."""

import json

import numpy as np
from PIL import Image

from fastsp import pipeline


def _args(out):
    return [
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--stage1-steps",
        "4",
        "--stage2-steps",
        "2",
        "--compare-num",
        "10",
        "--compare-steps",
        "2",
    ]


def test_pipeline_runs_both_stages_and_compares(tmp_path, capsys):
    out = tmp_path / "pipeline"
    assert pipeline.main(_args(out)) == 0
    stdout = capsys.readouterr().out
    assert "comparison (no CFG)" in stdout
    assert "--resume" not in stdout  # the user gave none: no note about it
    sp = json.loads((out / "stage2_self_perceptual" / "config.json").read_text())["train"]
    mse = json.loads((out / "stage2_mse" / "config.json").read_text())["train"]
    assert sp["objective"] == "self_perceptual" and mse["objective"] == "mse"
    assert sp["init"] == mse["init"] == str(out / "stage1_mse")
    assert sp["seed"] == mse["seed"] == 1 and sp["steps"] == mse["steps"] == 2
    for run in ("stage1_mse", "stage2_self_perceptual", "stage2_mse"):
        assert (out / run / "checkpoints").is_dir()
    with Image.open(out / "comparison.png") as image:
        assert image.width > 2 * image.height * 0.9  # two grids side by side

    # Stacked panels line sample i of every run up in one column: the same pixels as the panels
    # side by side, one above the other.
    runs = {"mse": out / "stage2_mse", "sp": out / "stage2_self_perceptual"}
    sampled = dict(num=10, steps=2, seed=0, device="cpu", columns=5)
    pipeline.write_comparison(tmp_path / "side.png", runs, **sampled)
    pipeline.write_comparison(tmp_path / "stacked.png", runs, stacked=True, **sampled)
    side = np.asarray(Image.open(tmp_path / "side.png"))
    stacked = np.asarray(Image.open(tmp_path / "stacked.png"))
    panel_width = (side.shape[1] - 16) // 2  # two panels and the 16-pixel gap
    panel_height = (stacked.shape[0] - 16) // 2
    assert stacked.shape[1] == panel_width and side.shape[0] == panel_height
    for i in range(2):
        left, top = i * (panel_width + 16), i * (panel_height + 16)
        np.testing.assert_array_equal(
            stacked[top : top + panel_height], side[:, left : left + panel_width]
        )
    assert not np.array_equal(stacked[:panel_height], stacked[panel_height + 16 :])  # two runs

    # A rerun finds every stage finished and trains nothing more.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert pipeline.main(_args(out)) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before


def test_pipeline_rejects_bad_counts(tmp_path, capsys):
    assert pipeline.main(["--stage1-steps", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--stage1-steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
