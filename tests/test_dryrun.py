"""The fake-CUDA dry run (fastsp.dryrun): the tiny preset's step passes for both objectives with
FLOPs that match an independent count, and planted faults are reported by name.

fastsp.dryrun registers fake CUDA process-wide before torch loads, so every case runs in a
subprocess; the first one also builds the C++ extension (cached afterwards; fastsp.fake_cuda
builds it once under a lock, however many workers start a dry run at once).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import prefork
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastsp.dryrun_parallel import check_world_size, pop_world_size
from fastsp.errors import ConfigError
from fastsp.model_config import UNetConfig
from fastsp.unet import UNet

REPO = Path(__file__).resolve().parents[1]
# The fake CUDA is for a CPU-only torch; a CUDA build brings its own, which needs its GPU.
pytestmark = [
    pytest.mark.skipif(
        torch.backends.cuda.is_built() and not torch.cuda.is_available(),
        reason="a CUDA build of torch without a GPU: the dry run needs the CPU-only build or a GPU",
    ),
]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    # Forked from a dry-run server (tests/prefork.py) that registered fake CUDA before torch, as
    # `python -m fastsp.dryrun` does: the same process a fresh interpreter would be after its
    # imports.
    return prefork.run([sys.executable, *args], cwd=REPO, timeout=timeout)


def _reference_flops(model_cfg: dict, batch: int, resolution: int) -> dict[str, int]:
    """FlopCounterMode of a plain fp32 forward + backward on the real CPU, attention written out
    as two batched matmuls (the math backend), so that the counter sees every matmul."""
    config = UNetConfig(**{**model_cfg, "attention_backend": "math"})
    torch.manual_seed(0)
    model = UNet(config)
    x = torch.randn(batch, config.in_channels, resolution, resolution)
    t = torch.randint(0, 1000, (batch,))
    labels = torch.randint(0, config.num_classes + 1, (batch,)) if config.num_classes else None
    with FlopCounterMode(display=False) as counter:
        prediction = model(x, t, labels=labels, context=None)
        torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction)).backward()
    return {
        str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()
    }


@pytest.mark.slow
def test_tiny_dry_run_passes_for_both_objectives_with_independently_checked_flops(tmp_path):
    out = tmp_path / "dryrun.json"
    result = _run(["-m", "fastsp.dryrun", "--preset", "tiny", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "self-perceptual / MSE FLOP ratio" in result.stdout
    figures = json.loads(out.read_text())
    mse, sp = figures["steps"]["mse"], figures["steps"]["self_perceptual"]

    # The MSE step's FLOPs are one forward + backward of the online model (the loss, clipping,
    # AdamW and EMA have no matmuls). A GPU's flash attention backward recomputes the scores: 5
    # matmuls where the math path's backward has 4, so attention counts 7/6 of the reference's
    # 6 batched matmuls per call; everything else (convolutions, linears) must match exactly.
    reference = _reference_flops(mse["model"], figures["batch_size"], figures["resolution"])
    attention = reference.pop("bmm")
    expected = sum(reference.values()) + attention * 7 / 6
    assert mse["flops"] == pytest.approx(expected, rel=1e-12)
    for op in ("convolution", "convolution_backward"):
        assert mse["flops_by_op"][op] == reference[op]

    # The self-perceptual step adds two forwards of the frozen network up to the mid block and
    # the backward of one of them (input gradients only): more than MSE, less than three times.
    assert figures["sp_mse_flop_ratio"] == pytest.approx(sp["flops"] / mse["flops"])
    assert 1.0 < figures["sp_mse_flop_ratio"] < 3.0
    assert sp["peak_bytes"] > mse["peak_bytes"] > 0
    # 40% of 989 TFLOP/s dense bf16 (H100 SXM and H200 SXM)
    images_per_s = figures["batch_size"] * 0.4 * 989e12 / mse["flops"]
    assert figures["images_per_s"]["H100 SXM"] == pytest.approx(images_per_s)
    assert figures["images_per_s"]["H200 SXM"] == pytest.approx(images_per_s)
    assert mse["graph"] == [] and sp["graph"] == []  # the fast step would be captured

    # The predicted step (fastsp.roofline): the FLOPs FlopCounterMode counts, op by op, and a
    # time no shorter than all of them at the dense bf16 peak, or all bytes at HBM bandwidth.
    for step in (mse, sp):
        predicted = step["predicted"]
        assert predicted["flops"] == step["flops"]
        for gpu, flops_s, bytes_s in (("H100 SXM", 989e12, 3.35e12), ("H200 SXM", 989e12, 4.8e12)):
            seconds = predicted["gpus"][gpu]["seconds"]
            floor = max(step["flops"] / flops_s, predicted["bytes"] / bytes_s)
            assert seconds >= floor * (1 - 1e-12)  # a sum of per-op maxima, rounded
            assert predicted["gpus"][gpu]["images_per_s"] == pytest.approx(
                figures["batch_size"] / seconds
            )
        assert len(predicted["top_ops"]) == 10
    assert "predicted step (roofline" in result.stdout


@pytest.mark.slow
def test_planted_faults_are_reported_naming_the_fault(tmp_path):
    out = tmp_path / "faults.json"
    result = _run([str(REPO / "tests" / "dryrun_faults.py"), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert "CPU tensor in a CUDA op" in found["cpu_tensor"]
    assert "cuda:0 and cpu" in found["cpu_tensor"]
    assert "host read of a CUDA tensor" in found["host_read"]
    assert "_local_scalar_dense" in found["host_read"]
    assert "operands of different dtypes" in found["autocast_dtype"]
    assert "float" in found["autocast_dtype"] and "BFloat16" in found["autocast_dtype"]
    assert "CPU learning-rate tensor" in found["cpu_lr"]
    assert "host-to-device copy inside the step" in found["host_to_device"]
    assert "cpu float32 [11]" in found["host_to_device"]
    assert found.pop("host_read_eager") is None  # an eager step may read on the host
    for name, line in found.items():
        assert "\n" not in line, name


@pytest.mark.slow
def test_options_train_refuses_are_refused_with_exit_2():
    # every option goes through fastsp/train.py's parser and checks, before any step runs
    result = _run(
        [
            "-m",
            "fastsp.dryrun",
            "--preset",
            "tiny",
            "--train-step",
            "reference",
            "--precision",
            "bf16",
        ]
    )
    assert result.returncode == 2
    assert "--train-step reference" in result.stderr


def test_a_json_path_that_cannot_be_written_is_refused_before_the_step(tmp_path):
    result = _run(["-m", "fastsp.dryrun", "--preset", "tiny", "--json", str(tmp_path)])
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: --json {tmp_path} is a folder; pass a file path inside it"
    )
    assert "flops" not in result.stdout.lower()  # nothing was traced


def test_a_dit_preset_dry_runs_through_the_trainers_assembly():
    # the dry run builds what the trainer builds (fastsp.training.assembly): a DiT for a DiT preset
    result = _run(["-m", "fastsp.dryrun", "--preset", "dit_tiny", "--batch-size", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--preset dit_tiny, batch 4" in result.stdout
    assert "FLOP per step" in result.stdout and "peak live tensors" in result.stdout
    assert "fault" not in result.stderr


INTERNAL_ERROR_SCRIPT = """
import sys
import fastsp.dryrun as dryrun  # first: before torch
from fastsp.step import TrainStep

def update_ema(self):  # a bug of fastsp inside the step: not an op a GPU would refuse
    return self.no_such_buffer

TrainStep.update_ema = update_ema
sys.exit(dryrun.main(["--preset", "tiny", "--objective", "mse"]))
"""


def test_an_internal_error_is_reported_as_such_not_as_a_fault():
    result = _run(["-c", INTERNAL_ERROR_SCRIPT])
    assert result.returncode not in (0, 1), result.stderr[-3000:]  # 1: a fault of the step
    assert "fault:" not in result.stderr
    assert "Traceback" in result.stderr and "no_such_buffer" in result.stderr
    assert "internal error of the dry run" in result.stderr


@pytest.mark.slow
def test_the_flow_process_dry_runs_with_the_same_networks(tmp_path):
    # --diffusion flow changes the noising and the targets, not the networks: the MSE step's
    # convolutions count exactly what the DDPM one's do, and the step would be captured
    out = tmp_path / "dryrun.json"
    args = ["-m", "fastsp.dryrun", "--preset", "tiny", "--diffusion", "flow", "--flow-shift", "3"]
    result = _run([*args, "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    mse, sp = figures["steps"]["mse"], figures["steps"]["self_perceptual"]
    reference = _reference_flops(mse["model"], figures["batch_size"], figures["resolution"])
    for op in ("convolution", "convolution_backward"):
        assert mse["flops_by_op"][op] == reference[op]
    assert 1.0 < figures["sp_mse_flop_ratio"] < 3.0
    assert mse["graph"] == [] and sp["graph"] == []


@pytest.mark.slow
def test_a_lora_dry_run_holds_no_frozen_copy_and_no_full_optimizer_state(tmp_path):
    # The LoRA step through the dry run: the perceptual pass is the online model with its
    # adapters off, so what outlives a step is the fp32 model and the adapters' state alone.
    # A full fine-tune holds the model, its EMA and Adam's two moments (4 x 4 bytes per weight)
    # plus the bf16 frozen copy.
    out = tmp_path / "lora.json"
    argv = ["-m", "fastsp.dryrun", "--preset", "tiny", "--objective", "self_perceptual"]
    result = _run([*argv, "--lora-rank", "4", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    weights = sum(
        p.numel() for p in UNet(UNetConfig(**figures["steps"]["mse"]["model"])).parameters()
    )
    for objective in ("self_perceptual", "mse"):
        state = figures["steps"][objective]["state_bytes"]
        assert 4 * weights < state < 1.2 * 4 * weights, objective


@pytest.mark.slow
def test_model_guidance_and_a_normalised_loss_dry_run_beside_the_other_objectives(tmp_path):
    # Model guidance adds one forward of batch 2B without gradient (the EMA's conditional and
    # unconditional predictions): three times the MSE step's forward convolutions, the same
    # backward. Each objective's own options (--mg-scale, --perceptual-norm, --perceptual-on-t)
    # are reset for the other objectives' steps, which would refuse them.
    out = tmp_path / "mg.json"
    args = ["-m", "fastsp.dryrun", "--preset", "tiny", "--diffusion", "flow"]
    result = _run([*args, "--objective", "model_guidance", "--mg-scale", "0.3", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    mg, mse = figures["steps"]["model_guidance"], figures["steps"]["mse"]
    assert mg["flops_by_op"]["convolution"] == 3 * mse["flops_by_op"]["convolution"]
    assert mg["flops_by_op"]["convolution_backward"] == mse["flops_by_op"]["convolution_backward"]
    assert mg["graph"] == [] and mg["host_syncs"] == 0  # the guided step would be captured

    sp_options = ["--perceptual-norm", "energy", "--perceptual-on-t", "0,699", "--init", "x"]
    result = _run(["-m", "fastsp.dryrun", "--preset", "tiny", "--objective", "self_perceptual"]
                  + sp_options + ["--json", str(out)])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["steps"]["self_perceptual"]["graph"] == []


FSDP_SCRIPT = """
import sys
import fastsp.dryrun as dryrun  # first: before torch

tiny = ["--preset", "tiny", "--json"]
one = dryrun.main([*tiny, sys.argv[1], "--batch-size", "2"])
fsdp = one or dryrun.main([*tiny, sys.argv[2], "--batch-size", "8", *sys.argv[4:]])
lora = ["--lora-rank", "4", "--objective", "self_perceptual"]
sys.exit(fsdp or dryrun.main([*tiny, sys.argv[3], "--batch-size", "8", *lora, *sys.argv[4:]]))
"""


def _sharded_elements(model: torch.nn.Module, world_size: int) -> int:
    """Rank 0's elements of `model`'s parameters under FSDP2: each split along dim 0 into
    world_size equal chunks, the last padded (torch's fully_shard, Shard(0))."""
    return sum(
        -(-p.shape[0] // world_size) * p[0].numel() if p.dim() else 1 for p in model.parameters()
    )


@pytest.mark.slow
def test_an_fsdp2_rank_holds_its_shards_of_the_state_and_a_lower_peak(tmp_path):
    # Rank 0 of 4 under FSDP2 (a fake process group, fastsp.dryrun_parallel) against one
    # process, each training on 2 items: what outlives a step is the state of one process with
    # every parameter of the model, the EMA, Adam's two moments (4 x 4 bytes per weight) and the
    # bf16 frozen copy (2 bytes) cut to its padded Shard(0) chunk; the rest (the step's buffers,
    # Adam's step counts) is replicated. The peak falls: one block is gathered at a time. LoRA
    # under FSDP2 (its adapters-off perceptual pass) runs too, holding less.
    one, sharded, lora = tmp_path / "one.json", tmp_path / "fsdp4.json", tmp_path / "lora.json"
    fsdp = ["--parallel", "fsdp", "--dry-world-size", "4"]
    result = _run(["-c", FSDP_SCRIPT, str(one), str(sharded), str(lora), *fsdp])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 4 under FSDP2" in result.stdout
    figures = {n: json.loads(p.read_text())["steps"] for n, p in ((1, one), (4, sharded))}
    model = UNet(UNetConfig(**figures[1]["mse"]["model"]))
    weights = sum(p.numel() for p in model.parameters())
    for objective, state_bytes_per_weight in (("mse", 16), ("self_perceptual", 18)):
        alone, rank0 = figures[1][objective], figures[4][objective]
        assert rank0["world_size"] == 4 and alone["parameters"] == rank0["parameters"]
        replicated = alone["state_bytes"] - state_bytes_per_weight * weights
        assert 0 < replicated < 0.01 * alone["state_bytes"], objective
        shards = state_bytes_per_weight * _sharded_elements(model, 4)
        assert rank0["state_bytes"] == shards + replicated, objective
        assert rank0["peak_bytes"] < 0.5 * alone["peak_bytes"], objective
        lora_rank0 = json.loads(lora.read_text())["steps"][objective]
        assert lora_rank0["state_bytes"] < 0.6 * rank0["state_bytes"], objective


@pytest.mark.parametrize(
    "parallel, value, refusal",
    [
        ("ddp", "8", "--dry-world-size is the number of GPUs FSDP2 shards over"),
        ("fsdp", None, "--parallel fsdp in the dry run needs the number of GPUs"),
        ("fsdp", "0", "--dry-world-size '0' must be a number of GPUs, 1 or more"),
        ("fsdp", "eight", "--dry-world-size 'eight' must be a number of GPUs"),
    ],
)
def test_a_dry_world_size_that_makes_no_sense_is_refused_in_one_line(parallel, value, refusal):
    with pytest.raises(ConfigError, match=refusal) as error:
        check_world_size(parallel, value)
    assert "\n" not in str(error.value)


def test_the_dry_world_size_is_the_dry_runs_own_option():
    argv = ["--preset", "tiny", "--dry-world-size", "8", "--parallel", "fsdp"]
    assert pop_world_size(argv) == "8" and argv == ["--preset", "tiny", "--parallel", "fsdp"]
    assert pop_world_size(argv) is None
    assert check_world_size("ddp", None) == 1 and check_world_size("fsdp", "8") == 8


@pytest.mark.parametrize(
    "family",
    ["sdxl", "flux", *[pytest.param(f, marks=pytest.mark.slow) for f in ("pixart", "sana")]],
)
@pytest.mark.slow
def test_a_diffusers_family_dry_runs_from_its_config_alone(family, tmp_path):
    # --model diffusers on a folder with only config.json (no weight is read): the step of the
    # module itself, capturable, holding weights, EMA and Adam's moments (16 bytes per weight)
    # plus, for self-perceptual, the bf16 frozen copy (2 bytes per weight)
    from family_tiny import PROCESS, TINY, conditions, tiny_denoiser

    model = tiny_denoiser(family)
    model.save_config(tmp_path / "denoiser")
    parameters = sum(p.numel() for p in model.parameters())
    out = tmp_path / "dryrun.json"
    context_len = conditions(family, 1)["context"].shape[1]
    args = ["-m", "fastsp.dryrun", "--preset", "tiny", "--model", "diffusers", "--init"]
    args += [str(tmp_path / "denoiser"), "--diffusion", PROCESS[family], "--cond", "context"]
    args += ["--channels", "4", "--resolution", "8", "--context-len", str(context_len)]
    result = _run([*args, "--objective", "self_perceptual", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    mse, sp = figures["steps"]["mse"], figures["steps"]["self_perceptual"]
    assert mse["model"]["family"] == family and mse["model"]["class_name"] == TINY[family]["cls"]
    assert mse["parameters"] == sp["parameters"] == parameters
    assert mse["state_bytes"] >= 16 * parameters
    assert sp["state_bytes"] - mse["state_bytes"] >= 2 * parameters
    assert 1.0 < figures["sp_mse_flop_ratio"] < 3.0
    assert mse["graph"] == [] and sp["graph"] == [] and sp["host_syncs"] == 0


BUILD_SCRIPT = """
import sys
from fastsp import fake_cuda
fake_cuda.load_fake_cuda()  # builds into $TORCH_EXTENSIONS_DIR, then loads
import torch
sys.exit(0 if torch.zeros(1).sum() == 0 else 1)
"""


@pytest.mark.slow
def test_dry_runs_that_start_together_build_the_extension_once(tmp_path):
    # A job's ranks (or a test run's workers) starting dry runs at once into an empty extension
    # folder: one builds under the folder's lock, the other waits and loads the finished library.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_SCRIPT], cwd=REPO, env=env, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for process in starts:
        assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-3000:]
    (folder,) = tmp_path.iterdir()
    assert sorted(path.name for path in folder.iterdir()) == [
        ".build.lock",
        "fastsp_fake_cuda.so",
    ]  # one library; the compiler's objects went with their build folder


@pytest.mark.slow
def test_a_lora_family_dry_run_holds_no_frozen_copy_and_reads_nothing_on_the_host(tmp_path):
    # --lora-rank on a diffusers family: the step with the transformer's adapters off for the
    # perceptual pass, capturable; what outlives it is the fp32 base (4 bytes per weight) and
    # the adapters' state alone, not a frozen copy or the base's EMA and Adam moments
    from family_tiny import TINY, conditions, tiny_denoiser

    model = tiny_denoiser("flux")
    model.save_config(tmp_path / "denoiser")
    parameters = sum(p.numel() for p in model.parameters())
    out = tmp_path / "dryrun.json"
    args = ["-m", "fastsp.dryrun", "--preset", "tiny", "--model", "diffusers", "--init"]
    args += [str(tmp_path / "denoiser"), "--diffusion", "flow", "--cond", "context"]
    args += ["--channels", "4", "--resolution", "8", "--context-len"]
    args += [str(conditions("flux", 1)["context"].shape[1]), "--lora-rank", "2"]
    result = _run([*args, "--objective", "self_perceptual", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for objective in ("self_perceptual", "mse"):
        step = figures["steps"][objective]
        assert step["model"]["class_name"] == TINY["flux"]["cls"]
        assert 4 * parameters < step["state_bytes"] < 1.2 * 4 * parameters, objective
        assert step["graph"] == [] and step["host_syncs"] == 0, objective


FAMILY_FSDP_SCRIPT = """
import sys
import fastsp.dryrun as dryrun  # first: before torch

one = dryrun.main([*sys.argv[3:], "--batch-size", "2", "--json", sys.argv[1]])
fsdp = ["--parallel", "fsdp", "--dry-world-size", "2", "--no-channels-last"]
sys.exit(one or dryrun.main([*sys.argv[3:], "--batch-size", "4", *fsdp, "--json", sys.argv[2]]))
"""


@pytest.mark.slow
def test_a_diffusers_unet_under_fsdp2_holds_its_shards_of_the_state(tmp_path):
    # The tiny SDXL-layout diffusers UNet (fastsp.families), rank 0 of 2 under FSDP2 against one
    # process, 2 items each: the state of every weight (16 bytes: weights, EMA, Adam's moments;
    # 18 with the bf16 frozen copy) cut to its padded Shard(0) chunk, the replicated rest as
    # one process's; no host read in the sharded step. The self-perceptual step also keeps the
    # frozen copy's last all-gather, of the block before the "mid" tap (mid_block.resnets.1, in
    # bf16): the perceptual pass stops the forward by an exception (fastsp.perceptual), so the
    # root's post-forward, which frees FSDP2's last all-gather, never runs; the next step's
    # first all-gather replaces it.
    from family_tiny import conditions, tiny_denoiser

    model = tiny_denoiser("sdxl")
    model.save_config(tmp_path / "denoiser")
    one, sharded = tmp_path / "one.json", tmp_path / "fsdp2.json"
    args = ["--preset", "tiny", "--model", "diffusers", "--init", str(tmp_path / "denoiser")]
    args += ["--diffusion", "ddpm", "--cond", "context", "--channels", "4", "--resolution", "8"]
    args += ["--context-len", str(conditions("sdxl", 1)["context"].shape[1])]
    args += ["--objective", "self_perceptual"]
    result = _run(["-c", FAMILY_FSDP_SCRIPT, str(one), str(sharded), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = {n: json.loads(p.read_text())["steps"] for n, p in ((1, one), (2, sharded))}
    weights = sum(p.numel() for p in model.parameters())
    last_gathered = {"mse": 0, "self_perceptual": 2 * _elements(model.mid_block.resnets[-1])}
    for objective, state_bytes_per_weight in (("mse", 16), ("self_perceptual", 18)):
        alone, rank0 = figures[1][objective], figures[2][objective]
        assert rank0["world_size"] == 2 and alone["parameters"] == rank0["parameters"] == weights
        replicated = alone["state_bytes"] - state_bytes_per_weight * weights
        assert 0 < replicated < 0.01 * alone["state_bytes"], objective
        shards = state_bytes_per_weight * _sharded_elements(model, 2)
        assert rank0["state_bytes"] == shards + replicated + last_gathered[objective], objective
        assert rank0["host_syncs"] == 0, objective


def _elements(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
