"""fastsp.unet: shapes per preset, truncated forwards equal to full-forward taps, conditioning."""

from dataclasses import replace

import pytest
import torch

from fastsp.unet import UNET_PRESETS, UNet, UNetConfig

SD21_DIFFUSERS_PARAMS = 865_910_724


def _randomize(model: UNet, seed: int = 0) -> UNet:
    """Replace the zero inits (output conv, residual branches) so that every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))
    return model


def _model(config: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return _randomize(UNet(config), seed).eval()


def _inputs(config: UNetConfig, batch: int = 3, size: int = 8, seed: int = 1, ctx_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    labels = (
        torch.randint(0, config.num_classes, (batch,), generator=g) if config.num_classes else None
    )
    context = (
        torch.randn(batch, ctx_len, config.context_dim, generator=g) if config.context_dim else None
    )
    return x, t, labels, context


_TINY = UNET_PRESETS["tiny"]
_CONFIGS = {
    "tiny": _TINY,
    "digits": UNET_PRESETS["digits"],
    "digits-uncond": replace(UNET_PRESETS["digits"], num_classes=0),
    "tiny-context": replace(_TINY, context_dim=24, num_classes=0, transformer_depth=2),
    "tiny-sd-style": replace(_TINY, scale_shift_norm=False, attention_levels=(0, 1)),
}


@pytest.mark.parametrize("name", list(_CONFIGS))
@pytest.mark.parametrize("size", [8, 16])
def test_output_shape(name, size):
    config = _CONFIGS[name]
    model = _model(config)
    x, t, labels, context = _inputs(config, batch=2, size=size)
    out = model(x, t, labels=labels, context=context)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    taps = model(x, t, labels=labels, context=context, taps=model.tap_names)
    assert list(taps) == list(model.tap_names)
    n = len(config.channel_mult)
    for i in range(n):
        ch = config.base_channels * config.channel_mult[i]
        down_size = size // 2 ** min(i + 1, n - 1)
        assert taps[f"down{i}"].shape == (2, ch, down_size, down_size)
        up_ch = config.base_channels * config.channel_mult[n - 1 - i]
        up_size = size // 2 ** max(n - 2 - i, 0)
        assert taps[f"up{i}"].shape == (2, up_ch, up_size, up_size)
    mid_ch = config.base_channels * config.channel_mult[-1]
    assert taps["mid"].shape == (2, mid_ch, size // 2 ** (n - 1), size // 2 ** (n - 1))


def test_output_conv_is_zero_initialised():
    torch.manual_seed(0)
    model = UNet(_TINY)
    x, t, labels, _ = _inputs(_TINY)
    assert torch.count_nonzero(model.conv_out.weight) == 0
    assert torch.count_nonzero(model(x, t, labels)) == 0


def test_tap_names_order():
    model = UNet(_CONFIGS["digits"])
    assert model.tap_names == ("down0", "down1", "down2", "mid", "up0", "up1", "up2")
    assert len(model.down) == len(model.up) == 3
    tiny = UNet(_TINY)
    assert tiny.tap_names == ("down0", "down1", "mid", "up0", "up1")


def test_sd21_on_meta_device():
    config = UNET_PRESETS["sd21"]
    with torch.device("meta"):
        model = UNet(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - SD21_DIFFUSERS_PARAMS) <= 0.01 * SD21_DIFFUSERS_PARAMS
    assert n_params == SD21_DIFFUSERS_PARAMS  # our structure matches the SD2.1-base UNet exactly
    x = torch.empty(1, 4, 64, 64, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    context = torch.empty(1, 77, 1024, device="meta")
    assert model(x, t, context=context).shape == (1, 4, 64, 64)
    mid = model(x, t, context=context, taps=["mid"])["mid"]
    assert mid.shape == (1, 1280, 8, 8)
    # head_dim 64 at 320, 640 and 1280 channels.
    heads = {m.heads for m in model.modules() if type(m).__name__ == "Attention"}
    assert heads == {5, 10, 20}


class _Recorder:
    """Forward hooks that record each module's output."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.outputs[name] = output

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _tap_modules(model: UNet) -> dict[str, torch.nn.Module]:
    modules = {f"down{i}": m for i, m in enumerate(model.down)}
    modules["mid"] = model.mid
    modules.update({f"up{j}": m for j, m in enumerate(model.up)})
    modules["conv_out"] = model.conv_out
    return modules


def test_truncated_mid_forward_equals_full_forward_tap_and_stops():
    config = _CONFIGS["tiny-context"]
    model = _model(config)
    x, t, labels, context = _inputs(config, size=16)
    recorder = _Recorder(_tap_modules(model))
    full = model(x, t, labels, context)
    full_mid = recorder.outputs["mid"]
    assert set(recorder.outputs) == set(model.tap_names) | {"conv_out"}
    recorder.outputs.clear()
    taps = model(x, t, labels, context, taps=["mid"])
    assert list(taps) == ["mid"]
    assert torch.equal(taps["mid"], full_mid)
    assert torch.equal(recorder.outputs["mid"], taps["mid"])
    # Nothing after the mid block ran.
    assert set(recorder.outputs) == {"down0", "down1", "mid"}
    assert full.shape == x.shape
    recorder.remove()


@pytest.mark.parametrize("name", ["tiny", "digits"])
def test_every_tap_matches_full_forward(name):
    config = _CONFIGS[name]
    model = _model(config)
    x, t, labels, context = _inputs(config, size=16)
    recorder = _Recorder(_tap_modules(model))
    model(x, t, labels, context)
    full = dict(recorder.outputs)
    order = [*model.tap_names, "conv_out"]
    for k, tap in enumerate(model.tap_names):
        recorder.outputs.clear()
        out = model(x, t, labels, context, taps=[tap])
        assert list(out) == [tap]
        assert torch.equal(out[tap], full[tap]), tap
        assert set(recorder.outputs) == set(order[: k + 1]), tap
    # Several taps at once stop after the deepest one, wherever it is in the list.
    recorder.outputs.clear()
    out = model(x, t, labels, context, taps=["mid", "down0"])
    assert set(out) == {"mid", "down0"}
    assert torch.equal(out["down0"], full["down0"]) and torch.equal(out["mid"], full["mid"])
    assert "up0" not in recorder.outputs
    recorder.remove()


def test_unknown_tap_raises_listing_valid_names():
    model = UNet(_TINY)
    x, t, labels, _ = _inputs(_TINY)
    with pytest.raises(ValueError, match="down0.*mid.*up1") as excinfo:
        model(x, t, labels, taps=["mid", "middle"])
    assert "middle" in str(excinfo.value)


def test_channels_last_matches_contiguous():
    config = _CONFIGS["tiny-context"]
    model = _model(config)
    x, t, labels, context = _inputs(config, size=16)
    ref = model(x, t, labels, context)
    ref_mid = model(x, t, labels, context, taps=["mid"])["mid"]
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = model_cl(x_cl, t, labels, context)
    mid = model_cl(x_cl, t, labels, context, taps=["mid"])["mid"]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mid, ref_mid, atol=1e-5, rtol=1e-4)
    assert ref.abs().mean() > 1e-3  # the comparison is not between zeros


def test_labels_none_is_the_null_label():
    model = _model(_TINY)
    x, t, labels, _ = _inputs(_TINY)
    null = torch.full_like(labels, _TINY.num_classes)
    assert model.label_embed.num_embeddings == _TINY.num_classes + 1
    torch.testing.assert_close(model(x, t, None), model(x, t, null), atol=0, rtol=0)
    assert not torch.allclose(model(x, t, labels), model(x, t, null))


def test_conditioning_mismatches_raise():
    uncond = UNet(_CONFIGS["digits-uncond"])
    x, t, labels, _ = _inputs(_TINY)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, labels)
    with pytest.raises(ValueError, match="context"):
        uncond(x, t, context=torch.randn(3, 4, 8))
    ctx_model = UNet(_CONFIGS["tiny-context"])
    with pytest.raises(ValueError, match="context"):
        ctx_model(x, t)


def test_timesteps_long_and_float_agree():
    model = _model(_TINY)
    x, t, labels, _ = _inputs(_TINY)
    torch.testing.assert_close(model(x, t, labels), model(x, t.float(), labels))


def test_input_gradient_through_frozen_mid_tap():
    """The perceptual loss: gradients w.r.t. the input of a frozen network, weights untouched."""
    model = _model(_TINY).requires_grad_(False)
    x, t, labels, _ = _inputs(_TINY, size=16)
    x = x.requires_grad_(True)
    target = model(x.detach() + 0.1, t, labels, taps=["mid"])["mid"]
    h = model(x, t, labels, taps=["mid"])["mid"]
    loss = (h - target).square().mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # Matches a finite difference along a random direction.
    g = torch.Generator().manual_seed(7)
    direction = torch.randn(x.shape, generator=g, dtype=torch.float64)
    model64 = model.double()
    eps = 1e-6

    def f(inp):
        return (model64(inp, t, labels, taps=["mid"])["mid"] - target.double()).square().mean()

    x64 = x.detach().double()
    fd = (f(x64 + eps * direction) - f(x64 - eps * direction)) / (2 * eps)
    torch.testing.assert_close((x.grad.double() * direction).sum(), fd, rtol=1e-3, atol=1e-7)


def test_truncated_forward_compiles_fullgraph():
    """The perceptual pass (taps=["mid"]) traces as one graph, forward and input gradient."""
    torch._dynamo.reset()
    model = _model(_TINY).requires_grad_(False)
    x, t, labels, _ = _inputs(_TINY, size=16)

    def mid_loss(x):
        return model(x, t, labels, taps=["mid"])["mid"].square().mean()

    compiled = torch.compile(mid_loss, fullgraph=True, backend="aot_eager")
    x_eager = x.clone().requires_grad_(True)
    x_compiled = x.clone().requires_grad_(True)
    mid_loss(x_eager).backward()
    loss = compiled(x_compiled)
    loss.backward()
    torch.testing.assert_close(loss, mid_loss(x))
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_tiny_trains_fast():
    """Twenty CPU steps of the tiny preset at batch 8 reduce the loss (and take ~a second)."""
    torch.manual_seed(0)
    model = UNet(_TINY)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    target = torch.randn(8, 1, 16, 16, generator=g) * 0.5
    losses = []
    for _ in range(20):
        loss = (model(x, t, labels) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"channel_mult": ()}, "channel_mult"),
        ({"attention_levels": (3,)}, "attention_levels"),
        ({"norm_groups": 7}, "norm_groups"),
        ({"head_dim": 48}, "head_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"attention_backend": "flash"}, "attention_backend"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"context_dim": -1}, "context_dim"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        UNetConfig(**overrides)


def test_zero_dim_timestep_is_broadcast_to_the_batch():
    model = _model(_TINY)
    x, t, labels, _ = _inputs(_TINY)
    one = torch.tensor(417)
    with torch.no_grad():
        expected = model(x, one.expand(x.shape[0]), labels)
        torch.testing.assert_close(model(x, one, labels), expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(10, 16), (16, 6)])
def test_size_not_divisible_by_the_halvings_is_a_clear_error(size):
    config = UNET_PRESETS["digits"]  # 3 levels: sizes must be multiples of 4
    model = _model(config)
    x = torch.randn(1, config.in_channels, *size)
    labels = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"input size {size[0]}x{size[1]} is not divisible by 4"):
        model(x, torch.tensor([3]), labels)


def test_conv_projections_and_per_level_heads():
    """SD 1.x's layout: 1x1-conv proj_in/proj_out, the same number of heads at every level."""
    config = replace(_TINY, linear_projection=False, num_heads=(2, 4))
    model = _model(config)
    transformer = model.mid.attn
    assert isinstance(transformer.proj_in, torch.nn.Conv2d)
    assert transformer.proj_in.weight.shape == (32, 32, 1, 1)
    assert transformer.blocks[0].attn1.heads == 4
    # The conv layout computes the same map as the linear one with the same weights.
    linear = UNet(replace(_TINY, num_heads=(2, 4))).eval()
    linear.load_state_dict(
        {
            k: v.flatten(1) if k.endswith(("proj_in.weight", "proj_out.weight")) else v
            for k, v in model.state_dict().items()
        }
    )
    x, t, labels, _ = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, labels), linear(x, t, labels))
