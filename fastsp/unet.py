"""ADM / Stable-Diffusion style UNet with named feature taps and an early-stopping forward.

Its shape is a `UNetConfig` with named presets `UNET_PRESETS`, both defined in the leaf
`fastsp.model_config` (so a checkpoint reads them without torch).

    conv_in -> down[0] .. down[n-1] -> mid -> up[0] .. up[n-1] -> norm_out, SiLU, conv_out

- ResBlock: GroupNorm, SiLU, conv3x3, timestep embedding (ADM scale-shift of the second norm, or
  SD's additive bias after the first conv), GroupNorm, SiLU, dropout, conv3x3, plus a 1x1 skip
  conv when the channel count changes. The second conv is zero-initialised (ADM), so every block
  starts as the identity.
- Transformer (SD's SpatialTransformer): GroupNorm, proj_in (Linear as SD 2.x, or a 1x1 conv as
  SD 1.x with linear_projection=False), then
  `transformer_depth` blocks of LayerNorm + self-attention, LayerNorm + cross-attention (when
  context_dim > 0), LayerNorm + GEGLU feed-forward (x4), each residual; proj_out
  (zero-initialised); residual around the whole. heads = channels // head_dim (SD 2.x), or
  num_heads[level] when num_heads is set (SD 1.x: 8 at every level). Every attention
  layer calls `fastsp.attention.attention` with the config's backend.
- Down level i: num_res_blocks x (ResBlock [+ transformer]) then a stride-2 conv (not on the last
  level); it pushes every block's output and the downsample's output onto the skip list.
- Mid: ResBlock, transformer (unless mid_attention=False), ResBlock.
- Up level j (j = 0 is the lowest resolution, the first one run): num_res_blocks + 1 x
  (concat a popped skip, ResBlock [+ transformer]) then nearest 2x upsampling + conv3x3 (not on the
  last level).

Taps: the output of `down[i]` is tap "down{i}", of `mid` is "mid", of `up[j]` is "up{j}"; a forward
hook on those submodules sees exactly the tensor the tap returns. `forward(..., taps=[...])`
returns the requested taps and runs nothing after the deepest one; the self-perceptual loss asks
for "mid" and so never runs the decoder half.

With the `sd21` preset the parameter count is Stable Diffusion 2.1-base's (865,910,724); q, k, v
projections are fused into one Linear (self-attention) or q plus a fused k, v (cross-attention),
which changes the layout of the weights, not their number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fastsp.attention import attention, choose_kernel, fmha_operators, not_supported_reasons
from fastsp.model_config import UNetConfig


# Sinusoidal timestep embedding (ADM / DDPM): [cos(t f_i), sin(t f_i)], f_i = 10000^(-i/half).
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [B] (long or float) -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, config: UNetConfig):
        super().__init__()
        self.scale_shift = config.scale_shift_norm
        self.norm1 = nn.GroupNorm(config.norm_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if self.scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(config.norm_groups, out_ch)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def check_context(context: torch.Tensor | None, context_dim: int) -> None:
    """A context is given iff the model has cross-attention (context_dim > 0); UNet and DiT."""
    if context_dim > 0 and context is None:
        raise ValueError(f"context [B, L, {context_dim}] is required (context_dim > 0)")
    if context_dim == 0 and context is not None:
        raise ValueError("context was given but the model has no cross-attention (context_dim=0)")


class Attention(nn.Module):
    """Multi-head attention over [B, L, C]; self-attention when context_dim is None. The UNet's
    q/k/v projections have no bias (as SD's); the DiT's have one (`qkv_bias=True`)."""

    # The context length the kernel is chosen for when none is known (SD's CLIP text length).
    PROBE_CONTEXT_LEN = 77
    PROBE_LEN = 64

    def __init__(
        self,
        dim: int,
        heads: int,
        backend: str,
        context_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.backend = backend
        # The kernel fastsp.attention runs, chosen once outside compiled code (`choose_kernel`,
        # see decide_attention); None: chosen per call.
        self.kernel: str | None = None
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, c = x.shape
        if self.is_cross:
            q = self.to_q(x).view(b, lq, self.heads, -1)
            k, v = self.to_kv(context).view(b, context.shape[1], 2, self.heads, -1).unbind(2)
        else:
            q, k, v = self.to_qkv(x).view(b, lq, 3, self.heads, -1).unbind(2)
        out = attention(q, k, v, backend=self.backend, kernel=self.kernel)
        return self.to_out(out.reshape(b, lq, c))

    def probe(self, device: torch.device, dtype: torch.dtype):
        """q, k, v as `forward` makes them in a training step (views of the q/k/v projections,
        needing gradients) of `dtype` on `device`, at short lengths: what xformers supports
        depends on head size, dtype, strides' alignment and the backward, not the length."""
        dim, length = self.to_out.in_features, self.PROBE_LEN
        with torch.enable_grad():
            if self.is_cross:
                x = torch.empty(1, length, dim, device=device, dtype=dtype, requires_grad=True)
                q = x.view(1, length, self.heads, -1)
                kv = torch.empty(
                    1, self.PROBE_CONTEXT_LEN, 2 * dim, device=device, dtype=dtype
                ).requires_grad_()
                k, v = kv.view(1, self.PROBE_CONTEXT_LEN, 2, self.heads, -1).unbind(2)
            else:
                qkv = torch.empty(1, length, 3 * dim, device=device, dtype=dtype).requires_grad_()
                q, k, v = qkv.view(1, length, 3, self.heads, -1).unbind(2)
        return q, k, v

    def choose_kernel(self, device: torch.device, dtype: torch.dtype) -> str:
        """Choose and keep this layer's kernel for a training step in `dtype` on `device`."""
        with torch.enable_grad():
            self.kernel = choose_kernel(self.backend, *self.probe(device, dtype))
        return self.kernel


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit: (a * gelu(g)) W_out, [a, g] = x W_in."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, config: UNetConfig):
        super().__init__()
        backend = config.attention_backend
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, backend)
        if config.context_dim > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, backend, context_dim=config.context_dim)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """The transformer over the pixels of [B, C, H, W] at one level.

    proj_in / proj_out are Linear layers over the channels (SD 2.x) or, with
    `linear_projection=False`, 1x1 convolutions (SD 1.x): the same map, kept in the layout of
    the checkpoints of each family.
    """

    def __init__(self, channels: int, heads: int, config: UNetConfig):
        super().__init__()
        self.linear = config.linear_projection
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        project = nn.Linear if self.linear else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = project(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, heads, config) for _ in range(config.transformer_depth)
        )
        self.proj_out = project(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        # [B, C, H, W] -> [B, HW, C]: a free view when y is channels_last. ATen's GroupNorm keeps
        # a channels_last input's layout only on the CPU; on CUDA it makes its input contiguous
        # (NCHW), so there y is NCHW, this reshape copies, and GroupNorm copied x before it (the
        # step benchmark measures both formats, benchmarks/bench_step.py --memory-formats).
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            y = self.proj_in(y)
        for block in self.blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """One encoder level; returns its last hidden state and appends its skips to `skips`."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, heads: int, last: bool, config: UNetConfig
    ):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, emb_dim, config)
            for i in range(config.num_res_blocks)
        )
        self.attn = (
            nn.ModuleList(SpatialTransformer(out_ch, heads, config) for _ in self.res)
            if heads
            else None
        )
        self.downsample = None if last else Downsample(out_ch)

    def forward(self, h, emb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h, emb)
            if self.attn is not None:
                h = self.attn[i](h, context)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    def __init__(self, ch: int, emb_dim: int, config: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(ch, ch, emb_dim, config)
        heads = config.heads(len(config.channel_mult) - 1)
        self.attn = SpatialTransformer(ch, heads, config) if config.mid_attention else None
        self.res2 = ResBlock(ch, ch, emb_dim, config)

    def forward(self, h, emb, context) -> torch.Tensor:
        h = self.res1(h, emb)
        if self.attn is not None:
            h = self.attn(h, context)
        return self.res2(h, emb)


class UpLevel(nn.Module):
    """One decoder level; pops its skips from the end of `skips` and returns its output."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        skip_chs: Sequence[int],
        emb_dim: int,
        heads: int,
        last: bool,
        config: UNetConfig,
    ):
        super().__init__()
        chs = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.res = nn.ModuleList(
            ResBlock(c + s, out_ch, emb_dim, config) for c, s in zip(chs, skip_chs, strict=True)
        )
        self.attn = (
            nn.ModuleList(SpatialTransformer(out_ch, heads, config) for _ in self.res)
            if heads
            else None
        )
        self.upsample = None if last else Upsample(out_ch)

    def forward(self, h, emb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(torch.cat([h, skips.pop()], dim=1), emb)
            if self.attn is not None:
                h = self.attn[i](h, context)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class UNet(nn.Module):
    """The denoiser: forward(x [B, C, H, W], t [B], labels, context) -> [B, C, H, W].

    H and W must be divisible by 2 ** (len(channel_mult) - 1).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        base = config.base_channels
        emb_dim = 4 * base
        n = len(config.channel_mult)
        chs = [base * m for m in config.channel_mult]

        self.time_embed = nn.Sequential(
            nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_embed = (
            nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes > 0 else None
        )
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)

        skip_chs = [base]
        self.down = nn.ModuleList()
        in_ch = base
        for i in range(n):
            last = i == n - 1
            heads = config.heads(i) if i in config.attention_levels else 0
            self.down.append(DownLevel(in_ch, chs[i], emb_dim, heads, last, config))
            skip_chs += [chs[i]] * (config.num_res_blocks + (0 if last else 1))
            in_ch = chs[i]

        self.mid = MidBlock(in_ch, emb_dim, config)

        self.up = nn.ModuleList()
        for j in range(n):
            i = n - 1 - j  # the resolution level this up level works at
            level_skips = [skip_chs.pop() for _ in range(config.num_res_blocks + 1)]
            heads = config.heads(i) if i in config.attention_levels else 0
            self.up.append(UpLevel(in_ch, chs[i], level_skips, emb_dim, heads, i == 0, config))
            in_ch = chs[i]

        self.norm_out = nn.GroupNorm(config.norm_groups, in_ch)
        self.conv_out = nn.Conv2d(in_ch, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

        self.tap_names: tuple[str, ...] = (
            *(f"down{i}" for i in range(n)),
            "mid",
            *(f"up{j}" for j in range(n)),
        )

    def _embed(self, x, t, labels) -> torch.Tensor:
        if t.ndim == 0:  # one timestep for the whole batch (diffusers' schedulers pass these)
            t = t.expand(x.shape[0])
        emb_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(emb_dtype))
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full(
                    (x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device
                )
            emb = emb + self.label_embed(labels)
        elif labels is not None:
            raise ValueError("labels were given but the model is unconditional (num_classes=0)")
        return emb

    def _check_size(self, x):
        # Each down level but the last halves H and W, and the up levels concatenate the skips of
        # the same size: a size the halvings do not divide would fail inside torch.cat.
        multiple = 2 ** (len(self.config.channel_mult) - 1)
        h, w = x.shape[-2:]
        if h % multiple or w % multiple:
            raise ValueError(
                f"input size {h}x{w} is not divisible by {multiple} (2 ** (levels - 1) for "
                f"{len(self.config.channel_mult)} levels): pad or resize it to a multiple of "
                f"{multiple}"
            )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        taps: Sequence[str] | None = None,
    ):
        """Predict the model output, or return feature taps and stop early.

        Args:
            x: [B, in_channels, H, W] noisy input.
            t: [B] timesteps (long or float, 0..999), or a 0-d tensor for the whole batch.
            labels: [B] long class labels, or None (the null label when num_classes > 0).
                Label num_classes is the null label used for CFG dropout.
            context: [B, L, context_dim] cross-attention context; required iff context_dim > 0.
            taps: None, or names from `self.tap_names`.

        Returns:
            taps None: [B, in_channels, H, W]. Otherwise {name: tensor} for the requested taps;
            no module after the deepest requested tap runs.
        """
        last = len(self.tap_names) - 1
        wanted: set[str] = set()
        if taps is not None:
            if isinstance(taps, str):
                taps = (taps,)
            unknown = [name for name in taps if name not in self.tap_names]
            if unknown:
                raise ValueError(f"unknown tap(s) {unknown}; valid tap names: {self.tap_names}")
            wanted = set(taps)
            # Index of the deepest requested tap (-1 for none); a loop, as dynamo traces it.
            last = -1
            for k, name in enumerate(self.tap_names):
                if name in wanted:
                    last = k
        check_context(context, self.config.context_dim)
        self._check_size(x)

        out: dict[str, torch.Tensor] = {}
        if last < 0:
            return out
        emb = self._embed(x, t, labels)
        h = self.conv_in(x)
        skips = [h]
        stage = 0
        for i, level in enumerate(self.down):
            h = level(h, emb, context, skips)
            if f"down{i}" in wanted:
                out[f"down{i}"] = h
            if stage == last:
                return out
            stage += 1
        h = self.mid(h, emb, context)
        if "mid" in wanted:
            out["mid"] = h
        if stage == last:
            return out
        stage += 1
        for j, level in enumerate(self.up):
            h = level(h, emb, context, skips)
            if f"up{j}" in wanted:
                out[f"up{j}"] = h
            if stage == last and taps is not None:
                return out
            stage += 1
        return self.conv_out(F.silu(self.norm_out(h)))


def decide_attention(modules, device: torch.device, dtype: torch.dtype) -> str | None:
    """Choose once, outside compiled code, the attention kernel of every fastsp.unet attention
    layer in `modules` (nn.Modules, e.g. the online and the perceptual network) for a training
    step in `dtype` on `device`; torch.compile then traces only the chosen kernel (see
    fastsp.attention). Returns what was chosen, for backends.json; None if there are no layers.
    A forced backend that cannot run raises fastsp.attention.AttentionBackendError."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, Attention)]
    if not layers:
        return None
    counts: dict[str, int] = {}
    for layer in layers:
        kernel = layer.choose_kernel(device, dtype)
        counts[kernel] = counts.get(kernel, 0) + 1
    chosen = ", ".join(f"{kernel} for {n} of {len(layers)} layers" for kernel, n in counts.items())
    fallback = next((m for m in layers if m.backend == "auto" and m.kernel == "sdpa"), None)
    if fallback is not None:  # say why auto did not take xformers (fastsp.attention's reasons)
        reasons = not_supported_reasons("xformers", *fallback.probe(device, dtype))
        chosen += f"; xformers: {reasons[0] if reasons else 'no reason given'}"
    return f"{chosen} (chosen once before torch.compile, {dtype} on {device.type})"


def record_fmha(modules, device: torch.device, dtype: torch.dtype) -> str | None:
    """backends.json's attention_fmha: the xformers operators its dispatcher picks for each
    distinct attention layer shape in `modules` (a training step in `dtype`), found in its
    operator registry without running them (fastsp.attention.fmha_operators): on `device`'s GPU,
    or on an H100 (sm_90) where this machine has none. None if there are no layers."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, Attention)]
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(device) if on_gpu else (9, 0)
    lines = {}
    for layer in layers:
        q, k, v = layer.probe(torch.device("meta"), dtype)
        found = fmha_operators(q, k, v, True, capability)
        shape = f"q [B, L, {q.shape[2]}, {q.shape[3]}], k [B, {k.shape[1]}, ...] {dtype}"
        lines.setdefault(shape, ", ".join(f"{key} {value}" for key, value in found.items()))
    target = f"sm_{capability[0]}{capability[1]}" + ("" if on_gpu else " (an H100; no GPU here)")
    return f"{target}: " + " | ".join(f"{s}: {r}" for s, r in lines.items()) if layers else None
