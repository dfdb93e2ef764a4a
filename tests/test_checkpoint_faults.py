"""Checkpoint faults with real files and processes: damage, planted pickles, a full disk, keep-last.

Each fault must end in a CheckpointError that names the file and the fix, with every earlier
checkpoint intact and nothing executed from the file. A checkpoint of another model shape is
covered in test_checkpoint.py, test_cli_errors.py and test_perceptual.py.
"""

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import prefork
import pytest
import torch
from safetensors.torch import save_file

from fastsp import checkpoint as checkpoint_lib
from fastsp import config_file
from fastsp.checkpoint import CHECKPOINT_FILES, step_dir_name
from fastsp.config import TrainConfig
from fastsp.errors import CheckpointError
from fastsp.model_config import UNET_PRESETS
from fastsp.unet import UNet

REPO = Path(__file__).resolve().parents[1]
TINY = UNET_PRESETS["tiny"]
CONFIG = config_file.dumps(TrainConfig(), TINY)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _trained() -> tuple[UNet, torch.optim.Optimizer]:
    """A tiny UNet after one AdamW step, so the optimizer state holds tensors."""
    torch.manual_seed(0)
    model = UNet(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.tensor([3, 500])).square().mean().backward()
    optimizer.step()
    return model, optimizer


def _save(run_dir: Path, step: int, model: UNet, optimizer: torch.optim.Optimizer) -> Path:
    state = {"samples_seen": step}
    return checkpoint_lib.save_checkpoint(run_dir, step, model, model, optimizer, state, CONFIG)


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _load(checkpoint: Path, name: str) -> None:
    """Load as the command that needs `name` does: sampling for config.json, resuming otherwise."""
    if name == "config.json":
        checkpoint_lib.load_model(checkpoint)
        return
    model, ema = UNet(TINY), UNet(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint_lib.load_training_state(checkpoint, model, ema, optimizer)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    model, optimizer = _trained()
    return _save(tmp_path_factory.mktemp("good"), 3, model, optimizer)


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path) -> Path:
    """A fresh copy of a good checkpoint, at tmp_path/run/checkpoints/step_00000003."""
    copy = tmp_path / "run" / "checkpoints" / good_checkpoint.name
    shutil.copytree(good_checkpoint, copy)
    return copy


# ---------------------------------------------------------------------------------------------
# Damaged files


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garble(file: Path) -> None:
    file.write_bytes(b"\x8e\x01not a checkpoint file\xff\n" * (file.stat().st_size // 26 + 1))


_DAMAGE = {
    "truncated": _truncate,
    "empty": lambda file: file.write_bytes(b""),
    "missing": lambda file: file.unlink(),
    "garbled": _garble,
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_file_is_named_with_the_fix(checkpoint, name, damage):
    _DAMAGE[damage](checkpoint / name)
    with pytest.raises(CheckpointError) as error:
        _load(checkpoint, name)
    message = str(error.value)
    assert str(checkpoint / name) in message, message
    assert "damaged" in message and "Delete that folder" in message, message
    if damage == "missing":
        assert f"{name} is missing" in message, message
    with pytest.raises(CheckpointError, match=name):
        checkpoint_lib.verify_checkpoint(checkpoint)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "state.json", "config.json"])
def test_a_readable_file_of_the_wrong_kind_is_damaged(checkpoint, name):
    if name.endswith(".pt"):
        torch.save([torch.zeros(3)], checkpoint / name)
    else:
        (checkpoint / name).write_text("[1, 2]\n")
    with pytest.raises(CheckpointError, match="damaged") as error:
        _load(checkpoint, name)
    assert str(checkpoint / name) in str(error.value)


def test_a_failed_resume_leaves_model_and_optimizer_untouched(checkpoint):
    _truncate(checkpoint / "rng.pt")  # the last file read: the weights were readable
    model, optimizer = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_before = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(CheckpointError, match="rng.pt"):
        checkpoint_lib.load_training_state(checkpoint, model, UNet(TINY), optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], optimizer_before)


def test_optimizer_state_of_another_optimizer_is_refused(checkpoint):
    model, ema = UNet(TINY), UNet(TINY)
    params = list(model.parameters())
    two_groups = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}])
    with pytest.raises(CheckpointError, match="another optimizer"):
        checkpoint_lib.load_training_state(checkpoint, model, ema, two_groups)


def test_weights_of_another_shape_stay_a_checkpoint_error(checkpoint):
    save_file({"x": torch.zeros(2)}, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="another shape"):
        _load(checkpoint, "model.safetensors")


@pytest.mark.slow
def test_sampling_a_damaged_checkpoint_exits_2_and_writes_nothing(checkpoint, tmp_path):
    _truncate(checkpoint / "ema.safetensors")
    out = tmp_path / "x.png"
    run_dir = checkpoint.parent.parent  # a run folder: its latest checkpoint
    command = [sys.executable, "-m", "fastsp.sample", "--checkpoint", str(run_dir)]
    result = prefork.run(
        [*command, "--num", "1", "--steps", "1", "--out", str(out)], cwd=REPO, env=ENV, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert str(checkpoint / "ema.safetensors") in result.stderr, result.stderr
    assert "damaged" in result.stderr, result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Untrusted files: a planted pickle never runs


class _RunsCode:
    """Unpickling this runs a shell command: what a planted checkpoint file could do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # pickle.dump's protocol 5
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_a_planted_pickle_is_refused_and_runs_nothing(checkpoint, tmp_path, name, writer):
    sentinel = tmp_path / "SENTINEL"
    payload = {"state": _RunsCode(f"touch {shlex.quote(str(sentinel))}"), "param_groups": []}
    planted = checkpoint / name
    with open(planted, "wb") as f:
        if writer == "torch.save":
            torch.save(payload, f)
        else:
            pickle.dump(payload, f)

    with pytest.raises(CheckpointError) as error:
        _load(checkpoint, name)
    message = str(error.value)
    assert str(planted) in message and "refused" in message, message
    assert "not plain tensors" in message and "system" in message, message
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint_lib.verify_checkpoint(checkpoint)
    assert not sentinel.exists()

    # The file is a real exploit: an unsafe load runs the command.
    if writer == "torch.save":
        torch.load(planted, weights_only=False)
    else:
        pickle.loads(planted.read_bytes())
    assert sentinel.exists()


# ---------------------------------------------------------------------------------------------
# A full disk during a save, in a real process

# One child process, for every scenario: save step 1, lower the file size limit so that a write
# past it fails with EFBIG (SIGXFSZ ignored), exactly as a write to a full disk fails with ENOSPC,
# then save again and report the CheckpointError; exit 3 once every second save has failed.
_FULL_DISK_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import torch
    from fastsp import checkpoint as checkpoint_lib
    from fastsp import config_file
    from fastsp.config import TrainConfig
    from fastsp.model_config import UNET_PRESETS
    from fastsp.unet import UNet

    root, scenarios = sys.argv[1], json.loads(sys.argv[2])
    model = UNet(UNET_PRESETS["tiny"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.tensor([3, 500])).square().mean().backward()
    optimizer.step()
    config = config_file.dumps(TrainConfig(), UNET_PRESETS["tiny"])
    save = checkpoint_lib.save_checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    unlimited = resource.RLIM_INFINITY
    errors = {}
    for name, (limit, step) in scenarios.items():
        save(f"{root}/{name}", 1, model, model, optimizer, {"samples_seen": 1}, config)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, unlimited))
        try:
            save(f"{root}/{name}", step, model, model, optimizer, {"samples_seen": 99}, config)
        except checkpoint_lib.CheckpointError as error:
            errors[name] = str(error)
        resource.setrlimit(resource.RLIMIT_FSIZE, (unlimited, unlimited))
    print(json.dumps(errors))
    sys.exit(3 if len(errors) == len(scenarios) else 1)
    """
)


@pytest.fixture(scope="module")
def full_disk(good_checkpoint, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The run folders of the scenarios below and each one's error message."""
    weights_size = (good_checkpoint / "model.safetensors").stat().st_size
    optimizer_size = (good_checkpoint / "optimizer.pt").stat().st_size
    assert optimizer_size > weights_size + 4096  # AdamW holds two tensors per weight
    # 64 KiB stops model.safetensors, the first file; between the two sizes stops optimizer.pt.
    between = (weights_size + optimizer_size) // 2
    scenarios = {"safetensors": (65536, 2), "torch.save": (between, 2), "resave": (between, 1)}
    root = tmp_path_factory.mktemp("full_disk")
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(root), json.dumps(scenarios)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    return root, json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("scenario, step", [("safetensors", 2), ("torch.save", 2), ("resave", 1)])
def test_a_full_disk_keeps_the_previous_checkpoint(full_disk, scenario, step):
    root, errors = full_disk
    run_dir = root / scenario
    first = run_dir / "checkpoints" / step_dir_name(1)
    message = errors[scenario]
    for text in (f"cannot save checkpoint {step_dir_name(step)}", "File too large", "Free space"):
        assert text in message, message
    assert f"--resume: the previous checkpoint {first} is intact" in message, message

    assert _names(run_dir) == [step_dir_name(1)]  # no partial step, no temporary folder
    checkpoint_lib.verify_checkpoint(first)
    _load(first, "model.safetensors")
    assert checkpoint_lib.read_state(first)["samples_seen"] == 1  # the first save's copy
    assert checkpoint_lib.latest_checkpoint(run_dir) == first


# ---------------------------------------------------------------------------------------------
# Keep-last-k


@pytest.mark.parametrize("keep_last, kept", [(2, [4, 5]), (1, [5]), (0, [1, 2, 3, 4, 5])])
def test_keep_last_keeps_the_newest(tmp_path, keep_last, kept):
    model, optimizer = _trained()
    deleted = []
    for step in range(1, 6):  # as the trainer does: prune after each save
        _save(tmp_path, step, model, optimizer)
        deleted += checkpoint_lib.prune_checkpoints(tmp_path, keep_last)
    assert _names(tmp_path) == [step_dir_name(s) for s in kept]
    assert [p.name for p in deleted] == [step_dir_name(s) for s in range(1, 6) if s not in kept]
    checkpoint_lib.verify_checkpoint(checkpoint_lib.latest_checkpoint(tmp_path))


def test_keep_last_never_deletes_the_newest_good_checkpoint(tmp_path):
    model, optimizer = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, optimizer)
    newest = tmp_path / "checkpoints" / step_dir_name(3)
    _truncate(newest / "model.safetensors")
    deleted = checkpoint_lib.prune_checkpoints(tmp_path, 1)
    # step 2 is the only good one: kept; the damaged step 3 stays for its error message
    assert [p.name for p in deleted] == [step_dir_name(1)]
    assert _names(tmp_path) == [step_dir_name(2), step_dir_name(3)]
    with pytest.raises(CheckpointError, match="Delete that folder"):
        _load(checkpoint_lib.latest_checkpoint(tmp_path), "model.safetensors")
    shutil.rmtree(newest)  # the fix the error names
    assert checkpoint_lib.latest_checkpoint(tmp_path).name == step_dir_name(2)
    _load(checkpoint_lib.latest_checkpoint(tmp_path), "model.safetensors")


def test_prune_clears_crash_leftovers_and_restores_an_interrupted_swap(tmp_path):
    model, optimizer = _trained()
    for step in (1, 2):
        _save(tmp_path, step, model, optimizer)
    root = tmp_path / "checkpoints"
    shutil.copytree(root / step_dir_name(2), root / ".tmp-step_00000003-0badf00d")  # before rename
    half = root / ".deleting-step_00000001-deadbeef"  # a crash mid-delete
    shutil.copytree(root / step_dir_name(1), half)
    (half / "model.safetensors").unlink()
    # A crash mid re-save of step 2: the old copy was moved aside, the new one never arrived.
    os.replace(root / step_dir_name(2), root / ".old-step_00000002-12345678")
    assert checkpoint_lib.latest_checkpoint(tmp_path).name == step_dir_name(1)

    deleted = checkpoint_lib.prune_checkpoints(tmp_path, 1)
    assert _names(tmp_path) == [step_dir_name(2)]
    assert sorted(p.name for p in deleted) == [
        ".deleting-step_00000001-deadbeef",
        ".tmp-step_00000003-0badf00d",
        step_dir_name(1),
    ]
    checkpoint_lib.verify_checkpoint(root / step_dir_name(2))
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint_lib.prune_checkpoints(tmp_path, -1)


def test_latest_checkpoint_skips_an_incomplete_folder(tmp_path):
    model, optimizer = _trained()
    good = _save(tmp_path, 5, model, optimizer)
    incomplete = tmp_path / "checkpoints" / step_dir_name(9)
    shutil.copytree(good, incomplete)
    (incomplete / "rng.pt").unlink()
    assert checkpoint_lib.latest_checkpoint(tmp_path) == good
    assert checkpoint_lib.resolve_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="rng.pt is missing"):
        _load(incomplete, "rng.pt")  # named explicitly, it is used and its problem named
    shutil.rmtree(good)
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint_lib.resolve_checkpoint(tmp_path)
