"""fastsp.prepare: captioned images -> latent shards + metadata, on tiny random SD components.

- The shards hold diffusers' own VAE encoding (posterior mean x scaling factor) of each image and
  fastsp.sd_components.encode_text of its caption (StableDiffusionPipeline's way), in sorted
  order, for both caption conventions (NAME.txt, metadata.jsonl); metadata.json describes them.
- A rerun skips finished shards (mtimes unchanged); other options or other images are refused.
- A failed write leaves no partial shard, and the rerun finishes the job.
- A missing caption and an undecodable image stop the run, or are skipped and counted.
- Two torchrun processes write the same shards as one (with --sample-latents: seeded per shard).
- The trainer reads the shards: the scaling factor from the metadata (never applied twice), CFG
  dropout with the stored empty-prompt embedding, and a short text-conditioned run.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import prefork
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sd_tiny import save_pipeline_components

from fastsp import checkpoint as checkpoint_lib
from fastsp import config as config_lib
from fastsp import prepare
from fastsp.latent_shards import LatentsDataset, read_metadata, read_null_context
from fastsp.sd_components import encode_text, load_text_encoder
from fastsp.training.loop import build_run

REPO = Path(__file__).resolve().parents[1]
RES = 32  # the tiny VAE halves it once: 16 x 16 latents
# Sorted by file name; each image is RES high and wider, so preparing it is a center crop only.
CAPTIONS = {
    "a.png": "a photo of a cat",
    "b.png": "a red dog",
    "c.png": "blue",
    "sub/d.png": "a digit zero",
    "sub/e.png": "one",
}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return save_pipeline_components(tmp_path_factory.mktemp("sd"))


def _write_images(folder: Path, convention: str, captions=CAPTIONS) -> Path:
    rng = np.random.default_rng(0)
    for i, (name, caption) in enumerate(captions.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (RES, RES + 2 * i, 3), dtype=np.uint8)).save(path)
        if convention == "txt":
            path.with_suffix(".txt").write_text(caption + "\n")
    if convention == "jsonl":
        lines = [json.dumps({"file_name": n, "text": c}) for n, c in captions.items()]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _args(images, sd, out, *extra):
    return [
        "--images", str(images), "--vae", str(sd), "--text-encoder", str(sd),
        "--resolution", str(RES), "--out", str(out), "--shard-size", "2", "--batch-size", "2",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def _shards(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(p) for p in sorted(out.glob("shard_*.safetensors"))]


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


@pytest.fixture(scope="module")
def prepared(sd, tmp_path_factory):
    """A folder of captioned images (NAME.txt) and its prepared latents."""
    root = tmp_path_factory.mktemp("prepared")
    images = _write_images(root / "images", "txt")
    assert prepare.main(_args(images, sd, root / "latents")) == 0
    return images, root / "latents"


@pytest.mark.parametrize("convention", ["txt", "jsonl"])
def test_shards_hold_the_vae_latents_and_caption_contexts_in_order(sd, tmp_path, convention):
    from diffusers import AutoencoderKL

    images = _write_images(tmp_path / "images", convention)
    out = tmp_path / "latents"
    assert prepare.main(_args(images, sd, out)) == 0
    shards = _shards(out)
    assert [len(s["latents"]) for s in shards] == [2, 2, 1]
    latents = torch.cat([s["latents"] for s in shards])
    context = torch.cat([s["context"] for s in shards])
    assert latents.shape == (5, 4, RES // 2, RES // 2) and context.shape == (5, 8, 32)

    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    tokenizer, encoder = load_text_encoder(sd)
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        # The image as the trainer's readers prepare it, written out: a center crop to RES x RES
        # (the short side is RES already), RGB, [-1, 1].
        pixels = np.asarray(Image.open(images / name).convert("RGB"), dtype=np.float32)
        left = (pixels.shape[1] - RES) // 2
        x = torch.from_numpy(pixels[:, left : left + RES]).permute(2, 0, 1)[None] / 127.5 - 1
        with torch.no_grad():
            expected = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        torch.testing.assert_close(latents[i : i + 1], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            context[i : i + 1], encode_text(tokenizer, encoder, [caption]), rtol=0, atol=1e-6
        )
    assert not torch.allclose(context[0], context[1])  # the captions differ, so do the rows

    metadata = read_metadata(out)
    assert metadata["format"] == "fastsp-latents"
    assert metadata["scaling_factor"] == 0.18215
    assert (metadata["resolution"], metadata["latent_shape"]) == (RES, [4, 16, 16])
    assert metadata["context_shape"] == [8, 32]
    assert (metadata["num_images"], metadata["num_skipped"]) == (5, 0)
    assert Path(metadata["vae"]["folder"]).name == "vae"
    assert metadata["vae"]["config"]["scaling_factor"] == 0.18215
    assert Path(metadata["text_encoder"]["folder"]).name == "text_encoder"
    assert metadata["text_encoder"]["config"]["hidden_size"] == 32
    assert Path(metadata["tokenizer"]["folder"]).name == "tokenizer"
    assert [s["name"] for s in metadata["shards"]] == [
        "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"
    ]  # fmt: skip
    assert [s["num_images"] for s in metadata["shards"]] == [2, 2, 1]
    empty = encode_text(tokenizer, encoder, [""])[0]
    torch.testing.assert_close(read_null_context(out), empty, rtol=0, atol=0)

    # The trainer's reader: the empty prompt is not a shard, the latents are not scaled again.
    dataset = LatentsDataset(out)
    assert len(dataset) == 5 and dataset.context_shape == (8, 32)
    torch.testing.assert_close(dataset[4]["x"], latents[4], rtol=0, atol=0)
    torch.testing.assert_close(dataset.null_context, empty, rtol=0, atol=0)


def test_a_rerun_skips_finished_shards_and_refuses_other_options_or_images(
    sd, prepared, tmp_path, capsys
):
    images, out = prepared
    before = _mtimes(out)
    assert prepare.main(_args(images, sd, out)) == 0
    assert _mtimes(out) == before  # shards, empty prompt and metadata.json alike
    capsys.readouterr()
    # Another option: refused (exit 2), naming it, and nothing is rewritten.
    args = _args(images, sd, out)
    args[args.index("--resolution") + 1] = "16"
    assert prepare.main(args) == 2
    err = capsys.readouterr().err
    assert "metadata.json' was prepared with resolution 32 (now 16)" in err
    assert "another --out" in err
    assert prepare.main(_args(images, sd, out, "--sample-latents")) == 2
    assert "sample_latents False (now True)" in capsys.readouterr().err
    # Other captions: the shard's manifest no longer matches.
    changed = tmp_path / "images"
    _write_images(changed, "txt", {**CAPTIONS, "a.png": "a blue cat"})
    assert prepare.main(_args(changed, sd, out)) == 2
    assert "other images or captions" in capsys.readouterr().err
    assert {k: v for k, v in _mtimes(out).items() if k.startswith("shard_")} == {
        k: v for k, v in before.items() if k.startswith("shard_")
    }


def test_a_failed_write_leaves_no_partial_shard_and_the_rerun_finishes(
    sd, tmp_path, monkeypatch, capsys
):
    images = _write_images(tmp_path / "images", "txt")
    out = tmp_path / "latents"
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):  # the second shard's rename fails (a full disk, a kill)
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_lib.os, "replace", replace_then_fail)
    assert prepare.main(_args(images, sd, out)) == 4
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["shard_00000.safetensors"]  # no temporary file either
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(checkpoint_lib.os, "replace", real_replace)
    assert prepare.main(_args(images, sd, out)) == 0
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert read_metadata(out)["num_images"] == 5 and len(_shards(out)) == 3


def test_a_missing_caption_stops_or_is_skipped_and_counted(sd, tmp_path, capsys):
    images = _write_images(tmp_path / "images", "txt")
    (images / "b.txt").unlink()
    assert prepare.main(_args(images, sd, tmp_path / "stop")) == 2
    err = capsys.readouterr().err
    assert f"image '{images / 'b.png'}' has no caption" in err and "b.txt" in err
    assert not (tmp_path / "stop").exists()

    with pytest.warns(UserWarning, match="has no caption"):
        assert prepare.main(_args(images, sd, tmp_path / "skip", "--on-bad-data", "skip")) == 0
    metadata = read_metadata(tmp_path / "skip")
    assert (metadata["num_images"], metadata["num_skipped"]) == (4, 1)
    assert metadata["skipped"][0][0] == str(images / "b.png")

    # metadata.jsonl: a line for an image that is not there
    jsonl = _write_images(tmp_path / "jsonl", "jsonl")
    (jsonl / "c.png").unlink()
    assert prepare.main(_args(jsonl, sd, tmp_path / "stop2")) == 2
    assert "captions 'c.png', which is not an image" in capsys.readouterr().err


def test_a_bad_image_stops_or_is_skipped_and_counted(sd, prepared, tmp_path, capsys):
    images = _write_images(tmp_path / "images", "txt")
    (images / "b.png").write_bytes(b"not a png")
    assert prepare.main(_args(images, sd, tmp_path / "stop")) == 2
    err = capsys.readouterr().err
    assert f"cannot read image '{images / 'b.png'}'" in err and "--on-bad-data skip" in err

    out = tmp_path / "skip"
    with pytest.warns(UserWarning, match="b.png"):
        assert prepare.main(_args(images, sd, out, "--on-bad-data", "skip")) == 0
    metadata = read_metadata(out)
    assert (metadata["num_images"], metadata["num_skipped"]) == (4, 1)
    assert [s["num_images"] for s in metadata["shards"]] == [1, 2, 1]
    # the good images are the clean folder's, in order, without b.png (batched differently: the
    # VAE's float32 sums round differently)
    clean = torch.cat([s["latents"] for s in _shards(prepared[1])])
    torch.testing.assert_close(
        torch.cat([s["latents"] for s in _shards(out)]), clean[[0, 2, 3, 4]], rtol=0, atol=1e-6
    )


def _command(launcher: list[str], args: list[str]) -> None:
    """Run `launcher -m fastsp.prepare args` in a clean single-threaded environment (the same
    float32 reduction order in every process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = prefork.run(  # forked: a plain run from a server, torchrun's workers from another
        [sys.executable, *launcher, "-m", "fastsp.prepare", *args],
        cwd=REPO,
        timeout=300,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_torchrun_processes_write_the_same_shards_as_one(sd, tmp_path):
    images = _write_images(tmp_path / "images", "txt")
    one, two = tmp_path / "one", tmp_path / "two"
    sampled = ("--sample-latents", "--seed", "3")
    _command([], _args(images, sd, one, *sampled))
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _command(torchrun, _args(images, sd, two, *sampled))
    for a, b in zip(_shards(one), _shards(two), strict=True):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["context"], b["context"])
    assert read_metadata(one) == read_metadata(two)
    # the samples are drawn (not the mean), from generators seeded by (seed, shard)
    mean = tmp_path / "mean"
    assert prepare.main(_args(images, sd, mean)) == 0
    assert not torch.allclose(_shards(mean)[1]["latents"], _shards(one)[1]["latents"])


def test_the_trainer_takes_the_scaling_factor_and_null_context_from_the_metadata(
    prepared, tmp_path
):
    _, out = prepared
    fields = {"data": str(out), "cond": "context", "device": "cpu", "steps": 2}
    cfg, model_cfg = config_lib.resolve(
        "tiny", {**fields, "resolution": 16, "out": str(tmp_path / "r")}, {}
    )
    run = build_run(cfg, model_cfg)
    assert run.model_cfg.context_dim == 32 and run.model_cfg.in_channels == 4
    assert run.step.config.context_shape == (8, 32)
    torch.testing.assert_close(run.step.null_context, read_null_context(out), rtol=0, atol=0)
    for wrong, message in (
        ({"latent_scale": 0.18215}, "already carry the VAE's scaling factor 0.18215"),
        ({"resolution": 32}, "pass --resolution 16 (the latent side"),
    ):
        cfg, model_cfg = config_lib.resolve(
            "tiny", {**fields, "resolution": 16, "out": str(tmp_path / "x"), **wrong}, {}
        )
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            build_run(cfg, model_cfg)


def test_a_short_text_conditioned_run_trains_on_prepared_shards(prepared, tmp_path):
    _, out = prepared
    run_dir = tmp_path / "run"
    result = prefork.run(
        [
            sys.executable, "fastsp/train.py", "--preset", "tiny", "--data", str(out),
            "--cond", "context", "--context-dim", "32", "--channels", "4", "--resolution", "16",
            "--steps", "2", "--label-dropout", "0.5", "--out", str(run_dir),
        ],
        cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
