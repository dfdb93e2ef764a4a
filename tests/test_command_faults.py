"""The newer commands under a user's mistakes (issue 27, cases 5-7, 9 and 10): prepare, export,
evaluate, sample, the dry run and the trainer's data options, with real files and processes.

- Every command checks its outputs before work, in one line with the right word and status
  (never the trainer's "rerun with --resume"); a full disk during export exits 4 leaving nothing.
- The libraries' errors become one line: a VAE folder without weights, a planted pickle (refused
  by weights_only, the payload never runs), --device cuda without a GPU, letters at resolution 12,
  an unwritable TORCH_EXTENSIONS_DIR.
- Options are used or named: --context-dim on context shards, --label on a text model, --out
  with a non-PNG suffix.
- evaluate's default result lies outside the checkpoint folders the trainer prunes.
- A DiT trained at another size than its input_size exports the sample_size under which diffusers
  computes its trained positions, says so, and its export equals fastsp's model at the trained
  size (float64).
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sd_tiny import save_pipeline_components
from test_prepare import _args, _write_images

from fastsp import evaluate, export, prepare
from fastsp import sample as sample_cli
from fastsp import train as train_cli
from fastsp.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--device", "cpu", "--steps", "1"]
NOT_THE_TRAINERS = "--resume"


@pytest.fixture(scope="module")
def sd(build_once):
    return build_once("command_faults_sd", save_pipeline_components)


@pytest.fixture(scope="module")
def runs(build_once):
    """A tiny UNet run and a dit_tiny run trained at resolution 16 (its input_size is 8)."""

    def make(folder: Path) -> None:
        assert train_cli.main([*TINY, "--out", str(folder / "unet")]) == 0
        dit = ["--preset", "dit_tiny", "--device", "cpu", "--steps", "1", "--resolution", "16"]
        assert train_cli.main([*dit, "--out", str(folder / "dit")]) == 0

    return build_once("command_faults_runs", make)


def _one_line(capsys, *phrases: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for phrase in phrases:
        assert phrase in err, err
    assert NOT_THE_TRAINERS not in err, err
    return err


def test_prepare_checks_out_before_loading_a_model_and_names_bad_model_folders(
    sd, tmp_path, capsys
):
    images = _write_images(tmp_path / "images", "txt")
    broken = Path(shutil.copytree(sd, tmp_path / "sd"))
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # a VAE without weights
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # --out a file: refused for what it is, before the weightless VAE is even opened
    assert prepare.main(_args(images, broken, a_file)) == 2
    _one_line(capsys, f"--out {a_file} is a file, not a folder")
    assert prepare.main(_args(images, broken, tmp_path / "out")) == 2
    _one_line(capsys, f"--vae {broken / 'vae'}: cannot load it", "diffusion_pytorch_model")
    # a planted pickle in place of the weights: refused (weights_only), the payload never runs
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, broken / "vae" / "diffusion_pytorch_model.bin")
    assert prepare.main(_args(images, broken, tmp_path / "out")) == 2
    _one_line(capsys, f"--vae {broken / 'vae'}: cannot load it")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_checks_its_folder_before_reading_the_checkpoint(runs, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    missing = str(tmp_path / "no_checkpoint")  # never read: the folder is refused first
    for out, message in (
        (a_file, "is a file, not a folder"),
        (a_file / "unet", "is a file, not a folder, so nothing can be made in it"),
        (full, "already exists and is not empty"),
    ):
        assert export.main(["--checkpoint", missing, "--to-diffusers", str(out)]) == 2
        _one_line(capsys, str(out), message)


@pytest.mark.slow
def test_a_full_disk_during_export_exits_4_and_leaves_nothing(runs, tmp_path):
    weights = runs / "dit" / "checkpoints" / "step_00000001" / "ema.safetensors"
    limit = weights.stat().st_size // 2

    def small_disk() -> None:  # RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "exported" / "transformer"
    result = subprocess.run(
        [sys.executable, "-m", "fastsp.export", "--checkpoint", str(runs / "dit")]
        + ["--to-diffusers", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=small_disk,
    )  # fmt: skip
    assert result.returncode == 4, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {out}") and "nothing of it was written" in line
    assert "Traceback" not in result.stderr and NOT_THE_TRAINERS not in line
    assert os.listdir(out.parent) == []  # no temporary folder, no partial export


@pytest.mark.slow
def test_a_dit_trained_at_16_exports_the_positions_it_trained_with(runs, tmp_path, capsys):
    from diffusers import DiTTransformer2DModel

    from fastsp.dit_diffusers import export_dit

    out = tmp_path / "transformer"
    assert export.main(["--checkpoint", str(runs / "dit"), "--to-diffusers", str(out)]) == 0
    _one_line(capsys, "trained on 16x16 latents", "sample_size 8", "call the transformer on 16x16")
    assert json.loads((out / "config.json").read_text())["sample_size"] == 8
    # one step leaves the zero-initialised output layer near zero: random weights make the
    # positions count, written by the function the command calls
    model = load_model(runs / "dit").model.double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)
    export_dit(model, tmp_path / "random")
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "random").double().eval()
    x = torch.randn(3, 1, 16, 16, generator=generator, dtype=torch.float64)
    t, labels = torch.tensor([3, 400, 999]), torch.tensor([1, 5, 9])
    with torch.no_grad():
        expected = model(x, t, labels=labels)
        got = theirs(x, timestep=t, class_labels=labels).sample
    # both round the float64 position grid to float32 (diffusers' way): equal to ~1e-8; the grid
    # of another sample_size is off by 0.7
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_evaluate_writes_outside_the_pruned_checkpoints_and_checks_that_first(
    runs, tmp_path, capsys
):
    run = Path(shutil.copytree(runs / "unet", tmp_path / "run"))
    checkpoint = run / "checkpoints" / "step_00000001"
    args = evaluate.build_parser().parse_args(["--checkpoint", str(checkpoint), "--num", "8"])
    expected = run / "eval" / "step_00000001" / "eval_ddim_s50_cfg1_phi0_n8_ema_seed0.json"
    assert evaluate.default_out(checkpoint, args) == expected
    (run / "eval").write_text("")  # the default folder cannot be made: refused before sampling
    assert evaluate.main(["--checkpoint", str(run), "--num", "8"]) == 2
    _one_line(capsys, "the default --out", "is a file, not a folder")
    assert "sampling" not in capsys.readouterr().err
    alone = Path(shutil.copytree(checkpoint, tmp_path / "alone"))  # outside a run folder
    assert evaluate.default_out(alone, args).parent == alone


def test_sample_names_a_non_png_out_and_a_missing_gpu(runs, tmp_path, capsys):
    run = runs / "unet"
    assert sample_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    _one_line(capsys, "sample writes PNG images; pass a path ending in .png")
    if not torch.cuda.is_available():
        argv = ["--checkpoint", str(run), "--device", "cuda", "--out", str(tmp_path / "x.png")]
        assert sample_cli.main(argv) == 2
        _one_line(capsys, "--device cuda was requested but torch sees no CUDA GPU")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_trainer_names_a_context_dim_the_data_overrides_and_refuses_letters_at_12(
    tmp_path, capsys
):
    data = tmp_path / "latents"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "s.npy", rng.standard_normal((8, 1, 8, 8)).astype(np.float32))
    np.save(data / "s.context.npy", rng.standard_normal((8, 6, 32)).astype(np.float32))
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(data), "--cond", "context", "--context-dim", "64"]
    assert train_cli.main([*argv, "--out", str(out)]) == 0
    assert "context dim: 32, the data's own (--context-dim 64 applies to synthetic data only)" in (
        capsys.readouterr().out
    )
    assert json.loads((out / "config.json").read_text())["model"]["context_dim"] == 32
    letters = ["--data", "letters", "--resolution", "12", "--out", str(tmp_path / "l")]
    assert train_cli.main([*TINY, *letters]) == 2
    _one_line(capsys, "--resolution 12", "pass --resolution 8, 16, 32 or 64")
    assert not (tmp_path / "l").exists()


def test_the_dry_run_names_an_unwritable_extension_folder(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "fastsp.dryrun", "--preset", "tiny"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(a_file)},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "set TORCH_EXTENSIONS_DIR to a folder you can write in" in result.stderr
