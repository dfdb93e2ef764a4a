"""diffusers' UNet2DConditionModel config <-> `UNetConfig`: the schema of the fields fastsp's UNet
computes, maps or ignores; and where a diffusers UNet folder is (a UNet or a pipeline folder).

Its own module, beside fastsp.diffusers_unet (which converts the weights) rather than in it:
`--init DIFFUSERS_FOLDER` sets the model's shape while the command line resolves the configs
(fastsp.config.resolve), and that path imports no torch; fastsp.diffusers_unet needs torch for the
tensors. A leaf module: the standard library, fastsp.errors, fastsp.config_fields and
fastsp.model_config only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastsp.config_fields import is_int, is_sequence, option_flag, show_value
from fastsp.errors import ConfigError
from fastsp.family_config import find_denoiser_folder
from fastsp.model_config import UNetConfig

DIFFUSERS_UNET_CLASS = "UNet2DConditionModel"
# Bookkeeping fields, sample_size (only the pipelines' default image size), and
# addition_embed_type_num_heads (read only with an addition_embed_type, refused below).
_DIFFUSERS_IGNORED = (
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "sample_size",
    "addition_embed_type_num_heads",
)
# Fields whose value must be one of these for fastsp's UNet to compute the same function.
# upcast_attention only asks for fp32 attention scores, as every fastsp attention backend
# accumulates them.
_DIFFUSERS_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0.0,),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "upcast_attention": (False, True),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None,),
    "cross_attention_norm": (None,),
}
# Fields that map onto UNetConfig (unet_config_from_diffusers reads them).
_DIFFUSERS_MAPPED = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "attention_head_dim",
    "use_linear_projection",
    "norm_num_groups",
    "transformer_layers_per_block",
    "resnet_time_scale_shift",
)
# diffusers' block type of a level, without and with transformers
_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
_TIME_SCALE_SHIFT = {"default": False, "scale_shift": True}  # -> scale_shift_norm


def _per_level(value: Any, n: int) -> list[Any] | None:
    """diffusers' "an int for every level, or one per level"; None if it is neither."""
    if is_sequence(value):
        return list(value) if len(value) == n else None
    return [value] * n


def _all_false(value: Any) -> bool:
    return value is False or (is_sequence(value) and all(v is False for v in value))


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The UNetConfig of a diffusers UNet2DConditionModel config (its config.json as a dict).

    SD 1.x (1x1-conv projections, 8 heads at every level) and SD 2.x (linear projections,
    attention_head_dim = heads per level, 64 channels each) both map. A config fastsp's UNet cannot
    compute is refused with a ConfigError listing every such field with its value. diffusers'
    `attention_head_dim` is the number of heads (its `num_attention_heads` must be unset).
    """
    unsupported = []

    def refuse(name: str, allowed: str) -> None:
        unsupported.append(f"{name}={config.get(name)!r} ({allowed})")

    for name in sorted(config):
        if name in _DIFFUSERS_IGNORED or name in _DIFFUSERS_MAPPED:
            continue
        allowed = _DIFFUSERS_FIXED.get(name)
        if allowed is None:
            refuse(name, "a field fastsp does not know")
        elif name == "only_cross_attention":
            if not _all_false(config[name]):
                refuse(name, "supported: False")
        elif config[name] not in allowed:
            refuse(name, "supported: " + " or ".join(repr(a) for a in allowed))
    if config.get("_class_name", DIFFUSERS_UNET_CLASS) != DIFFUSERS_UNET_CLASS:
        refuse("_class_name", f"supported: {DIFFUSERS_UNET_CLASS!r}")

    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(channels)
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    levels = [i for i, kind in enumerate(down) if kind == _DOWN_BLOCKS[1]]
    if len(down) != n or any(kind not in _DOWN_BLOCKS for kind in down):
        refuse("down_block_types", f"{n} of {', '.join(_DOWN_BLOCKS)}")
    elif up != [_UP_BLOCKS[kind == _DOWN_BLOCKS[1]] for kind in reversed(down)]:
        refuse("up_block_types", "the down blocks' kinds in reverse order, as Up*Block2D")
    if not (n > 0 and all(is_int(c) and c % channels[0] == 0 for c in channels)):
        refuse("block_out_channels", "multiples of the first")
    in_channels = config.get("in_channels", 4)
    if config.get("out_channels", 4) != in_channels:
        refuse("out_channels", f"supported: in_channels = {in_channels}")
    if not is_int(config.get("layers_per_block", 2)):
        refuse("layers_per_block", "one integer for every level")
    depths = _per_level(config.get("transformer_layers_per_block", 1), n)
    if depths is None or len(set(depths)) != 1:
        refuse("transformer_layers_per_block", "the same integer at every level")
    heads = _per_level(config.get("attention_head_dim", 8), n)
    if heads is None or not all(is_int(h) and h >= 1 for h in heads):
        refuse("attention_head_dim", f"heads: one integer, or {n}")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in _TIME_SCALE_SHIFT:
        refuse("resnet_time_scale_shift", "supported: 'default' or 'scale_shift'")
    if not is_int(config.get("cross_attention_dim", 1280)):
        refuse("cross_attention_dim", "one integer")
    if unsupported:
        raise ConfigError(
            "this diffusers UNet config has fields fastsp's UNet does not support: "
            + "; ".join(unsupported)
        )

    # heads -> one head_dim when every level with transformers has the same one (SD 2.x),
    # else heads per level (SD 1.x).
    with_attention = sorted({*levels, n - 1})
    head_dims = {channels[i] // heads[i] for i in with_attention}
    same_dim = len(head_dims) == 1 and all(channels[i] % heads[i] == 0 for i in with_attention)
    try:
        return UNetConfig(
            in_channels=in_channels,
            base_channels=channels[0],
            channel_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=config.get("layers_per_block", 2),
            attention_levels=tuple(levels),
            head_dim=head_dims.pop() if same_dim else UNetConfig.head_dim,
            num_heads=() if same_dim else tuple(heads),
            transformer_depth=depths[0],
            context_dim=config.get("cross_attention_dim", 1280),
            num_classes=0,
            scale_shift_norm=_TIME_SCALE_SHIFT[shift],
            norm_groups=config.get("norm_num_groups", 32),
            mid_attention=True,
            linear_projection=bool(config.get("use_linear_projection", False)),
        )
    except ValueError as error:
        raise ConfigError(
            f"this diffusers UNet config does not map onto fastsp's: {error}"
        ) from None


def diffusers_config_from_unet(model: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel config (without `_diffusers_version`) of a UNetConfig;
    a ConfigError lists what diffusers' UNet2DConditionModel cannot express."""
    n = len(model.channel_mult)
    unsupported = []
    if model.num_classes > 0:
        unsupported.append(f"num_classes={model.num_classes} (diffusers has no null-label row)")
    if not model.mid_attention:
        unsupported.append("mid_attention=False (UNetMidBlock2DCrossAttn has a transformer)")
    if model.context_dim == 0:
        unsupported.append("context_dim=0 (diffusers' transformers always cross-attend)")
    if model.dropout != 0:
        unsupported.append(f"dropout={model.dropout} (exported models run at 0)")
    if unsupported:
        raise ConfigError(
            "this fastsp UNet has no diffusers UNet2DConditionModel equivalent: "
            + "; ".join(unsupported)
        )
    attn = [i in model.attention_levels for i in range(n)]
    return {
        "_class_name": DIFFUSERS_UNET_CLASS,
        "sample_size": sample_size,
        "in_channels": model.in_channels,
        "out_channels": model.in_channels,
        "block_out_channels": [model.base_channels * m for m in model.channel_mult],
        "layers_per_block": model.num_res_blocks,
        "down_block_types": [_DOWN_BLOCKS[a] for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [_UP_BLOCKS[a] for a in reversed(attn)],
        "cross_attention_dim": model.context_dim,
        "attention_head_dim": [model.heads(i) for i in range(n)],
        "use_linear_projection": model.linear_projection,
        "norm_num_groups": model.norm_groups,
        "norm_eps": 1e-5,
        "transformer_layers_per_block": model.transformer_depth,
        "resnet_time_scale_shift": "scale_shift" if model.scale_shift_norm else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
    }


def diffusers_unet_folder(path: str | Path) -> Path | None:
    """The diffusers UNet folder at `path`: the folder itself when its config.json names
    UNet2DConditionModel, or a pipeline folder's unet/; None for anything else (a fastsp
    checkpoint or run folder)."""
    root = Path(path)
    for folder in (root, root / "unet"):
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("_class_name") == DIFFUSERS_UNET_CLASS:
            return folder
    return None


def read_diffusers_config(folder: Path) -> dict[str, Any]:
    """config.json of a diffusers UNet folder, as a dict."""
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def init_model_config(init: str, model_overrides: dict[str, Any]) -> UNetConfig | None:
    """With --init of a diffusers UNet (or pipeline) folder, the architecture is that folder's,
    and a model option that says otherwise is refused; None for any other --init."""
    folder = diffusers_unet_folder(init) if init else None
    other = find_denoiser_folder(init) if init and folder is None else None
    if other is not None:  # a diffusers module fastsp's own models do not hold
        name = read_diffusers_config(other).get("_class_name")
        raise ConfigError(f"--init {init} holds a {name}: train it with --model diffusers")
    if folder is None:
        return None
    try:
        model = unet_config_from_diffusers(read_diffusers_config(folder))
    except ConfigError as error:
        raise ConfigError(
            f"{error}; or train diffusers' own module with --model diffusers"
        ) from None
    differ = {k: v for k, v in model_overrides.items() if getattr(model, k) != v}
    if differ:
        details = ", ".join(
            f"{option_flag(k)} {show_value(v)} vs {show_value(getattr(model, k))}"
            for k, v in differ.items()
        )
        raise ConfigError(
            f"--init {init} is a diffusers UNet whose config.json sets the architecture, and the "
            f"model options contradict it ({details}); drop those options"
        )
    return model
