"""Prompt sampling (python -m fastsp.sample --prompt): a tiny context-conditioned fastsp model
trained for 2 steps, sampled through tiny random Stable Diffusion components (tests/sd_tiny.py)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsp import checkpoint as checkpoint_lib
from fastsp import config_cli
from fastsp.diffusion import NoiseSchedule
from fastsp.sample import main
from fastsp.sampling import generate
from fastsp.training.loop import train

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sd_tiny import CONTEXT_DIM, MAX_LENGTH, save_pipeline_components  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a cat"
IMAGE_SIZE = 16  # 8x8 latents, decoded by the tiny VAE (one 2x upsampling)


def _train_run(out: Path, *extra: str) -> Path:
    argv = ["--preset", "tiny", "--data", "synthetic", "--channels", "4", "--resolution", "8"]
    argv += ["--steps", "2", "--out", str(out), *extra]
    train(*config_cli.parse_args(argv))
    return out


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return save_pipeline_components(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    context = ["--cond", "context", "--context-dim", str(CONTEXT_DIM)]
    return _train_run(tmp_path_factory.mktemp("run"), *context, "--context-len", str(MAX_LENGTH))


def _sample(run: Path, sd: Path, out: Path, *extra: str) -> np.ndarray:
    argv = ["--checkpoint", str(run), "--prompt", PROMPT, "--vae", str(sd / "vae")]
    argv += ["--text-encoder", str(sd / "text_encoder"), "--steps", "3", "--out", str(out)]
    assert main([*argv, *extra]) == 0
    return np.asarray(Image.open(out))


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what came before (a training run's progress bar)
    assert main(argv) == 2
    # the last line: transformers' loading progress bar may come before it
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ")
    return message


def test_one_image_is_written_at_the_vae_size_and_several_as_a_grid(run, sd, tmp_path):
    one = _sample(run, sd, tmp_path / "one.png", "--num", "1")
    assert one.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and one.dtype == np.uint8
    grid = _sample(run, sd, tmp_path / "grid.png", "--num", "3")  # 2x2 cells, 1 px padding
    assert grid.shape == (2 * (IMAGE_SIZE + 1) + 1, 2 * (IMAGE_SIZE + 1) + 1, 3)


def test_the_image_is_the_decoded_sample_of_the_encoded_prompt(run, sd, tmp_path):
    """The command equals encode_text -> generate (CFG against the empty prompt) -> decode."""
    from fastsp.sd_components import decode_latents, encode_text, load_text_encoder, load_vae

    image = _sample(run, sd, tmp_path / "cfg.png", "--num", "1", "--cfg", "3", "--seed", "5")
    loaded = checkpoint_lib.load_model(run)
    tokenizer, encoder = load_text_encoder(sd / "text_encoder")
    latents = generate(
        loaded.model,
        NoiseSchedule.from_config(loaded.train_config),
        1,
        (4, 8, 8),
        context=encode_text(tokenizer, encoder, [PROMPT]),
        null_context=encode_text(tokenizer, encoder, [""]),
        num_steps=3,
        guidance_scale=3.0,
        seed=5,
    )
    decoded = decode_latents(load_vae(sd / "vae"), latents)[0]
    expected = ((decoded + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    assert np.array_equal(image, expected.numpy())


def test_the_same_seed_gives_the_same_image_and_another_seed_another(run, sd, tmp_path):
    first = _sample(run, sd, tmp_path / "a.png", "--num", "1", "--seed", "1")
    again = _sample(run, sd, tmp_path / "b.png", "--num", "1", "--seed", "1")
    other = _sample(run, sd, tmp_path / "c.png", "--num", "1", "--seed", "2")
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_guidance_and_the_negative_prompt_change_the_image(run, sd, tmp_path):
    plain = _sample(run, sd, tmp_path / "plain.png", "--num", "1")
    guided = _sample(run, sd, tmp_path / "guided.png", "--num", "1", "--cfg", "4")
    negative = _sample(
        run, sd, tmp_path / "neg.png", "--num", "1", "--cfg", "4", "--negative-prompt", "dog"
    )
    assert not np.array_equal(plain, guided) and not np.array_equal(guided, negative)


def test_prompt_needs_the_vae_and_the_text_encoder(run, sd, tmp_path, capsys):
    argv = ["--checkpoint", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "x.png")]
    assert "--vae and --text-encoder" in _error(capsys, argv)
    message = _error(capsys, [*argv, "--vae", str(sd / "vae")])
    assert "--text-encoder" in message and "--vae and" not in message
    assert not (tmp_path / "x.png").exists()


def test_prompt_options_without_a_prompt_are_refused(run, sd, tmp_path, capsys):
    argv = ["--checkpoint", str(run), "--out", str(tmp_path / "x.png"), "--vae", str(sd)]
    assert "--vae only apply to prompt sampling; pass --prompt" in _error(capsys, argv)


def test_a_negative_prompt_without_guidance_is_refused(run, sd, tmp_path, capsys):
    argv = ["--checkpoint", str(run), "--prompt", PROMPT, "--vae", str(sd), "--text-encoder"]
    argv += [str(sd), "--negative-prompt", "dog", "--out", str(tmp_path / "x.png")]
    assert "pass --cfg > 1" in _error(capsys, argv)


def test_a_context_dim_that_is_not_the_encoders_hidden_size_is_refused(sd, tmp_path, capsys):
    other = _train_run(tmp_path / "run16", "--cond", "context", "--context-dim", "16")
    argv = ["--checkpoint", str(other), "--prompt", PROMPT, "--vae", str(sd), "--text-encoder"]
    argv += [str(sd), "--out", str(tmp_path / "x.png")]
    message = _error(capsys, argv)
    assert f"encodes to {CONTEXT_DIM} dimensions" in message and "context_dim is 16" in message


def test_a_model_without_cross_attention_is_refused(sd, tmp_path, capsys):
    digits = _train_run(tmp_path / "class", "--cond", "class")
    argv = ["--checkpoint", str(digits), "--prompt", PROMPT, "--vae", str(sd), "--text-encoder"]
    argv += [str(sd), "--out", str(tmp_path / "x.png")]
    assert "--cond context" in _error(capsys, argv)


def test_missing_folders_name_what_was_expected(run, tmp_path, capsys):
    argv = ["--checkpoint", str(run), "--prompt", PROMPT, "--vae", str(tmp_path / "no")]
    argv += ["--text-encoder", str(tmp_path / "no"), "--out", str(tmp_path / "x.png")]
    assert "does not exist; expected a local transformers CLIPTextModel" in _error(capsys, argv)


@pytest.mark.parametrize("missing", ["transformers", "diffusers"])
@pytest.mark.slow
def test_without_the_sd_extra_the_command_exits_2_naming_it(run, sd, tmp_path, missing):
    argv = ["--checkpoint", str(run), "--prompt", PROMPT, "--vae", str(sd), "--text-encoder"]
    argv += [str(sd), "--out", str(tmp_path / "x.png")]
    probe = (
        "import sys\n"
        f"sys.modules[{missing!r}] = None  # as if the sd extra were not installed\n"
        "from fastsp.sample import main\n"
        f"sys.exit(main({argv!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and missing in message
    assert 'pip install -e ".[sd]"' in message
    assert not (tmp_path / "x.png").exists()


def test_a_label_for_a_text_model_is_refused_not_ignored(run, sd, tmp_path, capsys):
    argv = ["--checkpoint", str(run), "--prompt", PROMPT, "--vae", str(sd), "--text-encoder"]
    argv += [str(sd), "--label", "3", "--out", str(tmp_path / "x.png")]
    assert "--label needs a class-conditional model" in _error(capsys, argv)
    assert not (tmp_path / "x.png").exists()


def test_a_tokenizer_of_another_length_than_the_training_context_is_refused(sd, tmp_path, capsys):
    other = _train_run(
        tmp_path / "run", "--cond", "context", "--context-dim", str(CONTEXT_DIM),
        "--context-len", str(MAX_LENGTH + 4),
    )  # fmt: skip
    argv = ["--checkpoint", str(other), "--prompt", PROMPT, "--vae", str(sd), "--text-encoder"]
    argv += [str(sd), "--out", str(tmp_path / "x.png")]
    message = _error(capsys, argv)
    assert f"pads prompts to {MAX_LENGTH} tokens" in message
    assert f"trained on contexts of {MAX_LENGTH + 4}" in message
    assert not (tmp_path / "x.png").exists()
