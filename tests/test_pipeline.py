"""The main job: stage 1, stage 2 and the MSE control, then the comparison PNG; reruns resume."""

import json

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

    # A rerun finds every stage finished and trains nothing more.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert pipeline.main(_args(out)) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before


def test_pipeline_rejects_bad_counts(tmp_path, capsys):
    assert pipeline.main(["--stage1-steps", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--stage1-steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
