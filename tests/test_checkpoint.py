"""Checkpoints: atomic folders, run-folder resolution, safe loading, shape errors."""

import json

import pytest
import torch

from fastsp import checkpoint as checkpoint_lib
from fastsp.errors import CheckpointError
from fastsp.model_config import UNET_PRESETS
from fastsp.unet import UNet


def _save(run_dir, step, model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.tensor([3, 500])).square().mean().backward()
    optimizer.step()
    config = json.dumps({"model": {}, "train": {}})
    return checkpoint_lib.save_checkpoint(
        run_dir, step, model, model, optimizer, {"samples_seen": step}, config
    ), optimizer


def test_save_then_load_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNET_PRESETS["tiny"])
    path, optimizer = _save(tmp_path, 5, model)
    assert path == tmp_path / "checkpoints" / "step_00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "ema.safetensors",
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    ]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    fresh, fresh_ema = UNet(UNET_PRESETS["tiny"]), UNet(UNET_PRESETS["tiny"])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoint_lib.load_training_state(path, fresh, fresh_ema, fresh_optimizer)
    assert state == {"step": 5, "samples_seen": 5}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved = optimizer.state_dict()["state"]
    loaded = fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"]) for k in saved)


def test_run_folder_means_latest_and_temporaries_are_ignored(tmp_path):
    model = UNet(UNET_PRESETS["tiny"])
    _save(tmp_path, 2, model)
    _save(tmp_path, 10, model)
    (tmp_path / "checkpoints" / ".tmp-step_00000020-dead").mkdir()  # a crash mid-save
    assert checkpoint_lib.resolve_checkpoint(tmp_path).name == "step_00000010"
    assert (
        checkpoint_lib.resolve_checkpoint(tmp_path / "checkpoints" / "step_00000002").name
        == "step_00000002"
    )
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_lib.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        checkpoint_lib.resolve_checkpoint(tmp_path / "checkpoints" / ".tmp-step_00000020-dead")


def test_resaving_a_step_replaces_it_whole(tmp_path):
    model = UNet(UNET_PRESETS["tiny"])
    first, _ = _save(tmp_path, 3, model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    second, _ = _save(tmp_path, 3, model)
    assert first == second
    loaded = UNet(UNET_PRESETS["tiny"])
    checkpoint_lib.load_weights(loaded, second / "model.safetensors")
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def test_weights_of_another_shape_are_refused(tmp_path):
    path, _ = _save(tmp_path, 1, UNet(UNET_PRESETS["tiny"]))
    import dataclasses

    bigger = UNet(dataclasses.replace(UNET_PRESETS["tiny"], base_channels=32))
    with pytest.raises(CheckpointError, match="another shape"):
        checkpoint_lib.load_weights(bigger, path / "model.safetensors")


def test_damaged_weights_are_an_error(tmp_path):
    path, _ = _save(tmp_path, 1, UNet(UNET_PRESETS["tiny"]))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint_lib.load_weights(UNet(UNET_PRESETS["tiny"]), path / "model.safetensors")


def test_atomic_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    checkpoint_lib.atomic_write_text(target, "one")
    checkpoint_lib.atomic_write_text(target, "two")
    assert target.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
