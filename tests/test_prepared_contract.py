"""The prepared-folder contract, under a user's mistakes and a killed or full-disk prepare: real
files, the prepare command and the trainer's reader (issue 27, cases 1-4, 9 and 12).

- metadata.json is prepare's completion mark: the trainer refuses shards without it, a shard it
  does not list, a listed shard that is missing, a shard of another preparation, a missing empty
  prompt; each message names the file, and the fix it gives works (the test follows it).
- No non-finite latent is written: a VAE with one NaN weight stops prepare naming the image.
- prepare never overwrites a metadata.json it did not write; a damaged one has one fix, the same
  from the trainer and from prepare, and following it works.
- A rerun is decided by content: a smaller --batch-size finishes a folder; a changed --shard-size
  is named as the option, not as a stray shard.
- Caption files that are not UTF-8 and a tokenizer longer than the encoder: one line, exit 2.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import prefork
import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_tiny import save_pipeline_components
from test_prepare import CAPTIONS, REPO, _args, _write_images

from fastsp import prepare, sd_components
from fastsp.errors import DataError
from fastsp.latent_shards import LatentsDataset, read_metadata, read_null_context


@pytest.fixture(scope="module")
def sd(build_once):
    return build_once("prepared_contract_sd", save_pipeline_components)


@pytest.fixture(scope="module")
def prepared(sd, build_once):
    """(images, latents) prepared once: 5 images in shards of 2, 2 and 1; read-only."""

    def make(folder: Path) -> None:
        images = _write_images(folder / "images", "txt")
        assert prepare.main(_args(images, sd, folder / "latents")) == 0

    root = build_once("prepared_contract_latents", make)
    return root / "images", root / "latents"


@pytest.fixture
def latents(prepared, tmp_path):
    """A writable copy of the prepared folder."""
    return Path(shutil.copytree(prepared[1], tmp_path / "latents"))


def _refused(folder: Path, *phrases: str) -> str:
    with pytest.raises(DataError) as error:
        LatentsDataset(folder)
    for phrase in phrases:
        assert phrase in str(error.value), str(error.value)
    return str(error.value)


def _same_as(folder: Path, reference: Path) -> None:
    dataset, expected = LatentsDataset(folder), LatentsDataset(reference)
    assert len(dataset) == len(expected) == 5
    for i in range(5):
        assert torch.equal(dataset[i]["x"], expected[i]["x"])
    assert torch.equal(dataset.null_context, expected.null_context)


def test_the_trainer_refuses_an_unfinished_preparation_and_the_advised_rerun_finishes_it(
    sd, prepared, latents, tmp_path
):
    images, reference = prepared
    (latents / "metadata.json").unlink()  # prepare killed before its completion mark
    (latents / "shard_00002.safetensors").unlink()
    result = prefork.run(
        [
            sys.executable, "fastsp/train.py", "--preset", "tiny", "--data", str(latents),
            "--cond", "context", "--resolution", "16", "--steps", "1",
            "--out", str(tmp_path / "run"),
        ],
        cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "no fastsp metadata.json" in line and "did not finish" in line
    assert "Rerun the same python -m fastsp.prepare command" in line
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    assert prepare.main(_args(images, sd, latents)) == 0
    _same_as(latents, reference)


def test_a_missing_listed_shard_is_named_and_the_rerun_writes_it(sd, prepared, latents):
    images, reference = prepared
    (latents / "shard_00001.safetensors").unlink()
    message = _refused(latents, "shard_00001.safetensors' is listed in metadata.json but missing")
    assert f"--images {images}" in message and "shard_size 2" in message
    assert prepare.main(_args(images, sd, latents)) == 0
    _same_as(latents, reference)


def test_a_shard_the_manifest_does_not_list_or_of_another_preparation_is_refused(
    sd, prepared, latents, tmp_path
):
    images, reference = prepared
    other_images = _write_images(tmp_path / "other", "txt", {**CAPTIONS, "a.png": "a dog"})
    other = tmp_path / "other_latents"
    assert prepare.main(_args(other_images, sd, other)) == 0
    # an extra shard: named; the fix (move it out) works
    shutil.copy(other / "shard_00000.safetensors", latents / "shard_00003.safetensors")
    _refused(latents, "shard_00003.safetensors' is not a shard metadata.json lists", "move it")
    (latents / "shard_00003.safetensors").rename(tmp_path / "moved.safetensors")
    _same_as(latents, reference)
    # a shard of another preparation under a listed name: named; delete it and rerun
    shutil.copy(other / "shard_00000.safetensors", latents / "shard_00000.safetensors")
    _refused(latents, "shard_00000.safetensors' holds other images", "delete it and rerun")
    (latents / "shard_00000.safetensors").unlink()
    assert prepare.main(_args(images, sd, latents)) == 0
    _same_as(latents, reference)


def test_a_missing_empty_prompt_is_required_and_the_rerun_rewrites_it(sd, prepared, latents):
    images, reference = prepared
    (latents / "empty_prompt.safetensors").unlink()
    _refused(latents, "empty-prompt embedding", "rerun python -m fastsp.prepare")
    assert prepare.main(_args(images, sd, latents)) == 0
    assert torch.equal(read_null_context(latents), read_null_context(reference))
    _same_as(latents, reference)


def test_a_damaged_metadata_json_has_one_fix_and_it_works(sd, prepared, latents, capsys):
    images, reference = prepared
    (latents / "metadata.json").write_text('{"format": "fastsp-lat')  # a torn write
    advice = "delete it and rerun python -m fastsp.prepare"
    _refused(latents, "metadata.json", advice)
    assert prepare.main(_args(images, sd, latents)) == 2
    assert advice in capsys.readouterr().err
    (latents / "metadata.json").unlink()
    assert prepare.main(_args(images, sd, latents)) == 0
    assert read_metadata(latents) == read_metadata(reference)
    _same_as(latents, reference)


def test_prepare_never_overwrites_a_metadata_json_it_did_not_write(sd, tmp_path, capsys):
    images = _write_images(tmp_path / "images", "txt")
    mine = json.dumps({"license": "CC-BY", "source": "my camera"})
    (images / "metadata.json").write_text(mine)
    assert prepare.main(_args(images, sd, images)) == 2  # --out: the images folder
    err = capsys.readouterr().err
    assert "holds a metadata.json that fastsp.prepare did not write" in err
    assert "pass another --out" in err
    assert (images / "metadata.json").read_text() == mine
    assert not list(images.glob("*.safetensors"))


def test_a_vae_with_a_nan_weight_writes_no_latents_and_names_the_image(sd, tmp_path, capsys):
    images = _write_images(tmp_path / "images", "txt")
    broken = Path(shutil.copytree(sd, tmp_path / "sd"))
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, weights)
    out = tmp_path / "latents"
    assert prepare.main(_args(images, broken, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"non-finite latents for {images / 'a.png'}" in err and "--vae" in err
    assert not out.exists()  # nothing written, no lock file left either


def test_a_rerun_takes_a_smaller_batch_size_and_names_a_changed_shard_size(
    sd, prepared, tmp_path, capsys
):
    images, reference = prepared
    out = tmp_path / "latents"
    out.mkdir()
    shutil.copy(reference / "shard_00000.safetensors", out)  # killed after the first shard
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    args = _args(images, sd, out)
    args[args.index("--shard-size") + 1] = "3"
    assert prepare.main(args) == 2
    err = capsys.readouterr().err
    assert "was prepared with shard_size 2 (now 3)" in err and "stray" not in err
    args = _args(images, sd, out)
    args[args.index("--batch-size") + 1] = "1"  # after an out-of-memory kill
    assert prepare.main(args) == 0
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    dataset, expected = LatentsDataset(out), LatentsDataset(reference)
    for i in range(5):  # batched differently: the VAE's float32 sums may round differently
        torch.testing.assert_close(dataset[i]["x"], expected[i]["x"], rtol=0, atol=1e-6)


def test_a_latin1_caption_and_a_tokenizer_longer_than_the_encoder_are_one_line(
    sd, tmp_path, capsys
):
    images = _write_images(tmp_path / "images", "txt")
    (images / "b.txt").write_bytes("un café".encode("latin-1"))
    assert prepare.main(_args(images, sd, tmp_path / "a")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{images / 'b.txt'}' is not UTF-8 text" in err
    assert "iconv" in err

    tokenizer = Path(shutil.copytree(sd / "tokenizer", tmp_path / "tokenizer"))
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps({**config, "model_max_length": 10**30})  # as a bare vocabulary folder has it
    )
    good = _write_images(tmp_path / "good", "txt")
    assert prepare.main(_args(good, sd, tmp_path / "b", "--tokenizer", str(tokenizer))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"pads prompts to {10**30} tokens" in err
    assert "has 8 positions" in err and not (tmp_path / "b").exists()


def test_ctrl_c_during_prepare_is_one_line_and_the_rerun_keeps_the_finished_shards(
    sd, prepared, tmp_path, monkeypatch, capsys
):
    images, reference = prepared
    out = tmp_path / "latents"
    real_encode, calls = sd_components.encode_images, []

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # where Ctrl-C lands: inside the VAE's group_norm
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(sd_components, "encode_images", interrupted_on_the_second_batch)
    assert prepare.main(_args(images, sd, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "interrupted (Ctrl-C): the shards written so far are complete; rerun the same command, "
        "it skips them"
    )
    assert sorted(os.listdir(out)) == ["shard_00000.safetensors"]  # no lock, no temporary file
    monkeypatch.setattr(sd_components, "encode_images", real_encode)
    assert prepare.main(_args(images, sd, out)) == 0
    _same_as(out, reference)


def test_files_prepare_does_not_read_are_named(sd, tmp_path, capsys):
    images = _write_images(tmp_path / "images", "txt")
    (images / "orphan.txt").write_text("a caption without an image")
    (images / "sub" / "photo.heic").write_bytes(b"\0" * 16)
    assert prepare.main(_args(images, sd, tmp_path / "latents")) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert note == [
        f"note: 2 files in '{images}' are not read (orphan.txt, sub/photo.heic): images are "
        ".bmp, .jpeg, .jpg, .png, .webp and captions are NAME.txt"
    ]
