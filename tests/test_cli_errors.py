"""Bad input: a short error naming the problem and the fix, exit status 2, and no files left."""

import subprocess
import sys
from pathlib import Path

import pytest

from fastsp import config
from fastsp import train as train_cli
from fastsp.errors import ConfigError
from fastsp.training.plan import check_batch

REPO = Path(__file__).resolve().parents[1]


def _fails(argv, capsys, out: Path, *expected: str) -> str:
    """Run the training CLI in-process: exit 2, print every `expected` text, write nothing."""
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(train_cli.main([*argv, "--out", str(out)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for text in expected:
        assert text in err, err
    assert len(err.splitlines()) <= 3, err  # short
    assert not out.exists(), "a failed start must not leave files behind"
    return err


def test_missing_data_folder(tmp_path, capsys):
    _fails(
        ["--preset", "tiny", "--data", str(tmp_path / "nope")],
        capsys,
        tmp_path / "out",
        "nope",
        "does not exist",
        "--data digits",
    )


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(
        ["--preset", "tiny", "--data", str(tmp_path / "empty")],
        capsys,
        tmp_path / "out",
        "no images found",
        "one subfolder per class",
        "--data digits",
    )


def test_unreadable_image(tmp_path, capsys):
    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"\x00not a png at all" * 10)
    _fails(
        ["--preset", "tiny", "--data", str(tmp_path / "images")],
        capsys,
        tmp_path / "out",
        "cannot read image",
        "broken.png",
        "--on-bad-data skip",
    )


def test_unknown_preset(tmp_path, capsys):
    _fails(["--preset", "sd99"], capsys, tmp_path / "out", "sd99", "tiny, digits, sd21")


def test_unknown_option_suggests_the_right_one(tmp_path, capsys):
    _fails(
        ["--preset", "tiny", "--batchsize", "8"],
        capsys,
        tmp_path / "out",
        "--batchsize",
        "--batch-size",
        "--help",
    )


def test_mistyped_value(tmp_path, capsys):
    _fails(["--preset", "tiny", "--steps", "ten"], capsys, tmp_path / "out", "--steps", "ten")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--steps", "-5"], ("steps", ">= 1")),
        (["--batch-size", "6", "--grad-accum", "4"], ("--batch-size 6", "divisible", "4")),
        (["--label-dropout", "1.5"], ("label_dropout", "[0, 1)")),
        (["--prediction-type", "eps"], ("zero_terminal_snr", "--prediction-type v")),
        (["--cond", "banana"], ("cond", "none, class, context")),
        (["--resolution", "9"], ("--resolution 9", "divisible by 2")),
        (["--optimizer", "apex_fused_adam"], ("apex", "--optimizer adamw")),
    ],
)
def test_bad_values(tmp_path, capsys, argv, expected):
    _fails(["--preset", "tiny", *argv], capsys, tmp_path / "out", *expected)


def test_resume_with_another_model_shape(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli.main(["--preset", "tiny", "--steps", "2", "--out", str(run_dir)]) == 0
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert (
        train_cli.main(
            [
                "--preset",
                "tiny",
                "--steps",
                "4",
                "--base-channels",
                "32",
                "--resume",
                "--out",
                str(run_dir),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--base-channels 32 (checkpoint: 16)" in err and "--out" in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_existing_run_without_resume_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli.main(["--preset", "tiny", "--steps", "2", "--out", str(run_dir)]) == 0
    assert train_cli.main(["--preset", "tiny", "--steps", "2", "--out", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_real_process_exit_status(tmp_path):
    # The same path through a real interpreter: status 2 and the message on stderr.
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "fastsp" / "train.py"),
            "--preset",
            "tiny",
            "--steps",
            "-1",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "steps" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("batch_size", "world_size", "grad_accum", "ok"),
    [(8, 2, 1, True), (3, 2, 1, False), (8, 2, 2, True), (12, 4, 2, False), (6, 3, 2, True)],
)
def test_global_batch_must_split_evenly_across_ranks_and_micro_batches(
    batch_size, world_size, grad_accum, ok
):
    # The world size is only known after torchrun starts the ranks, so this check runs there.
    cfg, _ = config.resolve("tiny", {"batch_size": batch_size, "grad_accum": grad_accum}, {})
    if ok:
        check_batch(cfg, world_size)
        return
    with pytest.raises(ConfigError) as error:
        check_batch(cfg, world_size)
    message = str(error.value)
    assert f"--batch-size {batch_size}" in message
    assert f"world size {world_size}" in message and str(world_size * grad_accum) in message
    assert "pick a multiple" in message
