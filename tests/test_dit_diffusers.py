"""fastsp's DiT against diffusers' own DiTTransformer2DModel: load, export, forward equality in
float64 on tiny random models built here."""

import json

import pytest
import torch

from fastsp import dit_diffusers
from fastsp.config import DIT_PRESETS, DiTConfig
from fastsp.dit import DiT
from fastsp.dit_diffusers import export_dit, load_dit
from fastsp.errors import CheckpointError, ConfigError

diffusers = pytest.importorskip("diffusers")

_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=3,
    num_layers=3,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=5,
    norm_eps=1e-5,
)


def _diffusers_dit(seed=0, **overrides):
    """A diffusers DiT with every weight random (no zero inits) and, as in the public weights,
    the same conditioning embedding in every block; float64, eval mode."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**{**_TINY, **overrides}).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model


def _inputs(batch=4, size=8, channels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,), generator=g)
    labels = torch.tensor([0, 4, 5, 2])[:batch]  # 5: the null label (CFG's)
    return x, t, labels


def _theirs(model, x, t, labels):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


@pytest.mark.parametrize("size", [8, 12])  # the sample_size, and a rescaled positional grid
def test_loaded_dit_computes_diffusers_forward(tmp_path, size):
    theirs = _diffusers_dit()
    theirs.save_pretrained(tmp_path / "transformer")
    ours = load_dit(tmp_path, dtype=torch.float64)  # a pipeline folder: its transformer/
    assert isinstance(ours, DiT) and ours.config.hidden_size == 16
    x, t, labels = _inputs(size=size)
    with torch.no_grad():
        out = ours(x, t, labels)
    expected = _theirs(theirs, x, t, labels)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_exported_dit_loads_in_diffusers_with_the_same_forward(tmp_path):
    torch.manual_seed(0)
    ours = DiT(DIT_PRESETS["dit_tiny"]).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    out = export_dit(ours, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel"
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(out, torch_dtype=torch.float64).eval()
    x, t, labels = _inputs(channels=1)
    with torch.no_grad():
        expected = ours(x, t, labels)
    torch.testing.assert_close(_theirs(theirs, x, t, labels), expected, rtol=0, atol=1e-10)
    # and back: the export round-trips exactly
    again = load_dit(out, dtype=torch.float64)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="not empty"):
        export_dit(ours, out)


def test_a_learned_sigma_loads_only_when_asked_keeping_the_eps_half(tmp_path):
    theirs = _diffusers_dit(out_channels=6)  # 2 x in_channels, as the public DiT-XL/2
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="drop_learned_sigma=True"):
        load_dit(tmp_path)
    ours = load_dit(tmp_path, dtype=torch.float64, drop_learned_sigma=True)
    x, t, labels = _inputs()
    with torch.no_grad():
        out = ours(x, t, labels)
    torch.testing.assert_close(out, _theirs(theirs, x, t, labels)[:, :3], rtol=0, atol=1e-10)


def test_what_fastsp_cannot_express_is_refused_by_name(tmp_path):
    theirs = _diffusers_dit()
    with torch.no_grad():  # a second block's embedding copy that differs from block 0's
        theirs.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    theirs.save_pretrained(tmp_path / "untied")
    with pytest.raises(CheckpointError, match="transformer_blocks.2.norm1.emb.* differs"):
        load_dit(tmp_path / "untied")
    with pytest.raises(ConfigError, match="activation_fn='geglu'.*dropout=0.1"):
        dit_diffusers.dit_config_from_diffusers({**_TINY, "dropout": 0.1, "activation_fn": "geglu"})
    with pytest.raises(ConfigError, match="num_classes=0.*context_dim=8"):
        dit_diffusers.diffusers_config_from_dit(DiTConfig(num_classes=0, context_dim=8))
