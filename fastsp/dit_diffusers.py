"""diffusers' DiTTransformer2DModel in and out: `load_dit`, `export_dit`, the key map.

fastsp's DiT computes the function of diffusers' DiTTransformer2DModel (the format of the public
DiT-XL/2 weights, facebook/DiT-XL-2-256's transformer/). The state dicts differ in names, in the
fused q/k/v projection, and in the conditioning embedding, which diffusers holds once per block
(each block's norm1.emb; its forward uses block 0's for the output layer too) and fastsp once:

    fastsp                       diffusers
    patch_embed                  pos_embed.proj
    time_embed.0 / .2            transformer_blocks.{k}.norm1.emb.timestep_embedder.linear_1 / _2
    label_embed                  transformer_blocks.{k}.norm1.emb.class_embedder.embedding_table
    blocks.{i}.adaln             transformer_blocks.{i}.norm1.linear
    blocks.{i}.attn.to_qkv       transformer_blocks.{i}.attn1.to_q, to_k, to_v (rows concatenated)
    blocks.{i}.attn.to_out       transformer_blocks.{i}.attn1.to_out.0
    blocks.{i}.mlp.fc1 / fc2     transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    adaln_out / proj_out         proj_out_1 / proj_out_2

Loading reads block 0's embedding and refuses a model whose blocks' copies differ (fastsp's DiT
cannot express that); export writes the copy into every block. diffusers' positional embedding is
a fixed buffer (not saved) that fastsp computes the same way. The public DiT models learn their
variance: out_channels = 2 x in_channels, the second half sigma. fastsp predicts no sigma, so such
a model loads only with `drop_learned_sigma=True`, keeping the first half (its eps prediction).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fastsp import checkpoint as checkpoint_lib
from fastsp.diffusers_unet import _weights_files, write_diffusers_folder
from fastsp.dit import DiT
from fastsp.errors import CheckpointError, ConfigError
from fastsp.model_config import DiTConfig

DIFFUSERS_DIT_CLASS = "DiTTransformer2DModel"
# Bookkeeping fields, and norm_num_groups (DiTTransformer2DModel stores but never uses it).
_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "norm_num_groups")
# Fields whose value must be one of these for fastsp's DiT to compute the same function.
# upcast_attention only asks for fp32 attention scores, as every fastsp attention backend
# accumulates them.
_FIXED: dict[str, tuple[Any, ...]] = {
    "dropout": (0.0,),
    "attention_bias": (True,),
    "activation_fn": ("gelu-approximate",),
    "upcast_attention": (False, True),
    "norm_type": ("ada_norm_zero",),
    "norm_elementwise_affine": (False,),
}
_MAPPED = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "sample_size",
    "patch_size",
    "num_embeds_ada_norm",
    "norm_eps",
)
# diffusers' defaults of the mapped fields (DiTTransformer2DModel.__init__)
_DEFAULTS = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=None,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_eps=1e-5,
)


def dit_config_from_diffusers(
    config: Mapping[str, Any], drop_learned_sigma: bool = False
) -> DiTConfig:
    """The DiTConfig of a diffusers DiTTransformer2DModel config (its config.json as a dict); a
    ConfigError lists every field fastsp's DiT cannot compute."""
    unsupported = []
    for name in sorted(config):
        if name in _IGNORED or name in _MAPPED:
            continue
        if name not in _FIXED:
            unsupported.append(f"{name}={config[name]!r} (a field fastsp does not know)")
        elif config[name] not in _FIXED[name]:
            allowed = " or ".join(repr(a) for a in _FIXED[name])
            unsupported.append(f"{name}={config[name]!r} (supported: {allowed})")
    if config.get("_class_name", DIFFUSERS_DIT_CLASS) != DIFFUSERS_DIT_CLASS:
        unsupported.append(
            f"_class_name={config['_class_name']!r} (supported: {DIFFUSERS_DIT_CLASS!r})"
        )
    values = {**_DEFAULTS, **{k: config[k] for k in _MAPPED if k in config}}
    channels = values["in_channels"]
    out = values["out_channels"] if values["out_channels"] is not None else channels
    if out == 2 * channels and not drop_learned_sigma:
        unsupported.append(
            f"out_channels={out} (a learned sigma: load with drop_learned_sigma=True to keep the "
            "eps half)"
        )
    elif out not in (channels, 2 * channels):
        unsupported.append(f"out_channels={out} (supported: in_channels or 2 x in_channels)")
    if values["num_embeds_ada_norm"] is None:
        unsupported.append("num_embeds_ada_norm=None (DiTTransformer2DModel requires classes)")
    if unsupported:
        raise ConfigError(
            "this diffusers DiT config has fields fastsp's DiT does not support: "
            + "; ".join(unsupported)
        )
    try:
        return DiTConfig(
            in_channels=channels,
            input_size=values["sample_size"],
            patch_size=values["patch_size"],
            hidden_size=values["num_attention_heads"] * values["attention_head_dim"],
            depth=values["num_layers"],
            heads=values["num_attention_heads"],
            mlp_ratio=4,
            norm_eps=values["norm_eps"],
            num_classes=values["num_embeds_ada_norm"],
        )
    except ValueError as error:
        raise ConfigError(
            f"this diffusers DiT config does not map onto fastsp's: {error}"
        ) from None


def diffusers_config_from_dit(model: DiTConfig) -> dict[str, Any]:
    """The DiTTransformer2DModel config (without `_diffusers_version`) of a DiTConfig; a
    ConfigError lists what diffusers' DiT cannot express."""
    unsupported = []
    if model.num_classes == 0:
        unsupported.append("num_classes=0 (DiTTransformer2DModel is class-conditional)")
    if model.context_dim > 0:
        unsupported.append(
            f"context_dim={model.context_dim} (DiTTransformer2DModel has no cross-attention)"
        )
    if model.mlp_ratio != 4:
        unsupported.append(f"mlp_ratio={model.mlp_ratio} (diffusers' DiT MLP is 4 x hidden_size)")
    if unsupported:
        raise ConfigError(
            "this fastsp DiT has no diffusers DiTTransformer2DModel equivalent: "
            + "; ".join(unsupported)
        )
    return {
        "_class_name": DIFFUSERS_DIT_CLASS,
        "num_attention_heads": model.heads,
        "attention_head_dim": model.hidden_size // model.heads,
        "in_channels": model.in_channels,
        "out_channels": model.in_channels,
        "num_layers": model.depth,
        "dropout": 0.0,
        "attention_bias": True,
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": model.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": model.norm_eps,
    }


# ---------------------------------------------------------------------------------------------
# The key map: fastsp prefix -> diffusers prefixes ({i}: the block; {k}: every block's copy)
_EMBED = "transformer_blocks.{k}.norm1.emb."
_MAP = (
    ("patch_embed", ("pos_embed.proj",)),
    ("time_embed.0", (_EMBED + "timestep_embedder.linear_1",)),
    ("time_embed.2", (_EMBED + "timestep_embedder.linear_2",)),
    ("label_embed", (_EMBED + "class_embedder.embedding_table",)),
    ("blocks.{i}.adaln", ("transformer_blocks.{i}.norm1.linear",)),
    (
        "blocks.{i}.attn.to_qkv",
        tuple(f"transformer_blocks.{{i}}.attn1.to_{n}" for n in "qkv"),
    ),
    ("blocks.{i}.attn.to_out", ("transformer_blocks.{i}.attn1.to_out.0",)),
    ("blocks.{i}.mlp.fc1", ("transformer_blocks.{i}.ff.net.0.proj",)),
    ("blocks.{i}.mlp.fc2", ("transformer_blocks.{i}.ff.net.2",)),
    ("adaln_out", ("proj_out_1",)),
    ("proj_out", ("proj_out_2",)),
)


def diffusers_names(name: str, depth: int) -> list[list[str]]:
    """diffusers' names of fastsp tensor `name`: one list of fused parts per copy (the
    conditioning embedding has a copy in each of the `depth` blocks, block 0's first)."""
    prefix, _, leaf = name.rpartition(".")
    for ours, theirs in _MAP:
        block = None
        if "{i}" in ours:
            head, _, rest = ours.partition("{i}")
            if not prefix.startswith(head):
                continue
            block, _, tail = prefix[len(head) :].partition(".")
            if not block.isdigit() or f".{tail}" != rest:
                continue
        elif prefix != ours:
            continue
        copies = range(depth) if any("{k}" in t for t in theirs) else (0,)
        return [[f"{t.format(i=block, k=k)}.{leaf}" for t in theirs] for k in copies]
    raise KeyError(f"fastsp tensor {name} has no diffusers name")


def _sigma_rows(config: DiTConfig) -> torch.Tensor:
    """Rows of a learned-sigma proj_out_2 ([p * p * 2C, D], channel fastest) that predict eps."""
    p2, c = config.patch_size**2, config.in_channels
    return (torch.arange(p2)[:, None] * 2 * c + torch.arange(c)[None]).flatten()


def dit_folder(path: str | Path) -> Path | None:
    """The diffusers DiT folder at `path` (config.json naming DiTTransformer2DModel), or a
    pipeline folder's transformer/; None for anything else."""
    root = Path(path)
    for folder in (root, root / "transformer"):
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("_class_name") == DIFFUSERS_DIT_CLASS:
            return folder
    return None


@torch.no_grad()
def _fill(model: DiT, folder: Path, drop_learned_sigma: bool) -> None:
    handles = [safe_open(str(f), framework="pt") for f in _weights_files(folder)]
    where = {key: h for h in handles for key in h.keys()}
    problems, used = [], set()
    config = model.config
    for name, target in model.state_dict().items():
        copies = diffusers_names(name, config.depth)
        absent = [s for parts in copies for s in parts if s not in where]
        if absent:
            problems.append(f"{absent[0]} missing")
            continue
        values = []
        for parts in copies:
            value = torch.cat([where[s].get_tensor(s) for s in parts])
            if name.startswith("proj_out.") and drop_learned_sigma:
                value = value[_sigma_rows(config)]
            values.append(value)
            used.update(parts)
        if values[0].shape != target.shape:
            problems.append(
                f"{' + '.join(copies[0])} {list(values[0].shape)} vs fastsp {name} "
                f"{list(target.shape)}"
            )
            continue
        differ = [k for k, v in enumerate(values) if not torch.equal(v, values[0])]
        if differ:
            problems.append(
                f"{copies[differ[0]][0]} differs from block 0's copy (fastsp's DiT shares one "
                "conditioning embedding across its blocks)"
            )
            continue
        target.copy_(values[0])
    left_over = sorted(set(where) - used)
    if left_over:
        problems.append(f"{len(left_over)} tensors fastsp does not map (e.g. {left_over[0]})")
    if problems:
        raise CheckpointError(
            f"{folder}'s weights do not fit fastsp's DiT: {'; '.join(problems[:3])}"
            f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}"
        )


def load_dit(
    path: str | Path, dtype: torch.dtype | None = None, drop_learned_sigma: bool = False
) -> DiT:
    """A fastsp DiT (eval mode, on the CPU) from a diffusers DiTTransformer2DModel folder (or a
    DiTPipeline folder's transformer/), or a fastsp DiT checkpoint or run folder (its EMA).

    drop_learned_sigma: load a model with out_channels = 2 x in_channels (the public DiT
    weights) keeping only the first half of its output, the eps prediction.
    """
    dtype = torch.float32 if dtype is None else dtype
    folder = dit_folder(path)
    if folder is None:
        model = checkpoint_lib.load_model(path, "ema").model
        if not isinstance(model, DiT):
            raise CheckpointError(f"{path} holds a {type(model).__name__}, not a DiT; pass a DiT")
        return model.to(dtype)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}/config.json cannot be read ({error})") from None
    model = DiT(dit_config_from_diffusers(config, drop_learned_sigma)).to(dtype)
    _fill(model, folder, drop_learned_sigma)
    return model.eval()


def diffusers_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """`model`'s tensors under diffusers' names: the fused q/k/v split, the conditioning
    embedding in every block (views, no copies)."""
    out = {}
    for name, tensor in model.state_dict().items():
        for parts in diffusers_names(name, model.config.depth):
            for key, part in zip(parts, tensor.chunk(len(parts)), strict=True):
                out[key] = part
    return out


def export_dit(
    model: DiT, out_dir: str | Path, scheduler_config: dict[str, Any] | None = None
) -> Path:
    """Write `model` as a diffusers folder that DiTTransformer2DModel.from_pretrained(out_dir)
    loads without options: config.json and diffusion_pytorch_model.safetensors (the model's
    dtype), and scheduler_config.json when given, written atomically
    (fastsp.diffusers_unet.write_diffusers_folder); out_dir must not exist or be empty."""
    config = diffusers_config_from_dit(model.config)
    # the per-block copies of the embedding are views of one tensor; safetensors stores each
    # name's own bytes, so each copy is cloned
    weights = {k: v.detach().cpu().clone() for k, v in diffusers_state_dict(model).items()}
    return write_diffusers_folder(out_dir, config, weights, scheduler_config)
