"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with named feature taps and an
early-stopping forward, beside the UNet and with the same interface.

Its shape is a `DiTConfig` with named presets `DIT_PRESETS`, both in the leaf
`fastsp.model_config`.

    x [B, C, H, W] -> patch embedding (a p x p stride-p conv) + fixed 2-D sin-cos positions
      -> block0 .. block{depth-1}   tokens [B, N, D], N = (H / p) (W / p)
      -> final adaLN (shift, scale) + Linear to p * p * C -> unpatchify -> [B, C, H, W]

- Conditioning c = the timestep's MLP embedding (+ the class embedding when num_classes > 0; row
  num_classes is the null label of CFG dropout, as in the UNet). One embedding for the whole
  network, as DiT has it (diffusers' port holds a copy of it in every block; the converter in
  fastsp.dit_diffusers shares it).
- Block (adaLN-Zero): a Linear of SiLU(c) gives shift, scale and gate for the attention and for the
  MLP (6 D values, the Linear zero-initialised so every block starts as the identity);
  x = x + gate_a * attn(LN(x) (1 + scale_a) + shift_a); with context_dim > 0 a cross-attention to
  the context follows, x = x + cross(x, context), without norm or gate, its output projection
  zero-initialised (PixArt-alpha's block); x = x + gate_m * mlp(LN(x) (1 + scale_m) + shift_m),
  the MLP a tanh-GELU between two Linears (mlp_ratio x D). LayerNorms without affine parameters.
- Every attention layer is fastsp.unet.Attention (with q/k/v biases here), so
  fastsp.unet.decide_attention chooses its kernel once before torch.compile, as for the UNet
  (xformers on CUDA, SDPA elsewhere).
- The output is in_channels channels (v, eps or x0 as the run's prediction_type says; no learned
  sigma), the final Linear zero-initialised (DiT's init): an untrained model predicts 0.

Taps: the output of block i is "block{i}" (token features [B, N, D]); "mid" is the output of the
first depth // 2 blocks (block{depth // 2 - 1}), so the self-perceptual pass runs half the blocks.
`forward(..., taps=[...])` returns the requested taps and runs no block after the deepest one.
`model.mid` is that block (the naive reference step hooks it, as it hooks the UNet's mid block).

The time and position embeddings follow diffusers' DiTTransformer2DModel (the format of the
public DiT-XL/2 weights), so its weights load unchanged: the timestep frequencies are
10000^(-i / (half - 1)) in [cos, sin] order (diffusers' Timesteps with downscale_freq_shift=1), and
the positional grid is scaled to a base of input_size / patch_size tokens per side, computed in
float64 and rounded to float32 as diffusers does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastsp.model_config import DiTConfig
from fastsp.unet import (  # one attention layer for both backbones (kernel chosen once)
    Attention,
    check_context,
)

TIME_FREQ_DIM = 256  # the sinusoidal timestep features the time MLP reads (DiT, diffusers)


# Timestep features as diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1):
# [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (half - 1)).
def timestep_features(t: torch.Tensor, dim: int = TIME_FREQ_DIM) -> torch.Tensor:
    """t [B] (long or float) -> [B, dim] float32."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0))
    freqs = torch.exp(exponent / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# 2-D sin-cos positions (MAE / DiT): the first half of the channels encodes the column, the second
# the row, each as [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (D / 4)); positions are scaled
# to a grid of `base` tokens per side (diffusers' get_2d_sincos_pos_embed, interpolation_scale 1).
def sincos_positions(dim: int, rows: int, cols: int, base: int, device=None) -> torch.Tensor:
    """-> [rows * cols, dim] float32, tokens in row-major order."""
    # float32 positions and float64 frequencies, as diffusers computes them, then float32
    row = torch.arange(rows, dtype=torch.float32, device=device) / (rows / base)
    col = torch.arange(cols, dtype=torch.float32, device=device) / (cols / base)
    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4)
    omega = 1.0 / 10000**omega

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    grid_col = col[None, :].expand(rows, cols)
    grid_row = row[:, None].expand(rows, cols)
    return torch.cat([encode(grid_col), encode(grid_row)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] * (1 + scale [B, D]) + shift [B, D]: adaLN's modulation."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block; with a context, PixArt-alpha's ungated cross-attention between."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, backend = config.hidden_size, config.attention_backend
        self.adaln = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, config.heads, backend, qkv_bias=True)
        if config.context_dim > 0:
            self.cross = Attention(
                dim, config.heads, backend, context_dim=config.context_dim, qkv_bias=True
            )
        else:
            self.cross = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.mlp = Mlp(dim, config.mlp_ratio * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(F.silu(c)).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross is not None:
            x = x + self.cross(x, context)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiT(nn.Module):
    """The denoiser: forward(x [B, C, H, W], t [B], labels, context) -> [B, C, H, W].

    H and W must be divisible by patch_size.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        self.patch_embed = nn.Conv2d(config.in_channels, dim, p, stride=p)
        base = config.input_size // p
        # Not a parameter (fixed), not saved (recomputed): the grid of input_size.
        self.register_buffer("pos_embed", sincos_positions(dim, base, base, base), persistent=False)
        self.time_embed = nn.Sequential(
            nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.label_embed = (
            nn.Embedding(config.num_classes + 1, dim) if config.num_classes > 0 else None
        )
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, p * p * config.in_channels)
        self.mid_index = config.depth // 2 - 1
        self.tap_names: tuple[str, ...] = (
            *(f"block{i}" for i in range(self.mid_index + 1)),
            "mid",
            *(f"block{i}" for i in range(self.mid_index + 1, config.depth)),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialisation: xavier-uniform Linears with zero biases, the patch embedding as a
        # Linear, N(0, 0.02) embeddings; adaLN modulations, the cross-attentions' outputs and the
        # output layer zero, so the blocks start as the identity and the model predicts 0.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        zero = [self.adaln_out, self.proj_out]
        for block in self.blocks:
            zero.append(block.adaln)
            if block.cross is not None:
                zero.append(block.cross.to_out)
        for module in zero:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def mid(self) -> nn.Module:
        """The block whose output is the "mid" tap."""
        return self.blocks[self.mid_index]

    def tap_block(self, name: str) -> int:
        """The index of the block whose output a tap is."""
        return self.mid_index if name == "mid" else int(name[len("block") :])

    def _embed(self, x, t, labels) -> torch.Tensor:
        if t.ndim == 0:  # one timestep for the whole batch (diffusers' schedulers pass these)
            t = t.expand(x.shape[0])
        emb_dtype = self.time_embed[0].weight.dtype
        c = self.time_embed(timestep_features(t).to(emb_dtype))
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full(
                    (x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device
                )
            c = c + self.label_embed(labels)
        elif labels is not None:
            raise ValueError("labels were given but the model is unconditional (num_classes=0)")
        return c

    def _positions(self, rows: int, cols: int, x: torch.Tensor) -> torch.Tensor:
        base = self.config.input_size // self.config.patch_size
        if (rows, cols) == (base, base):
            return self.pos_embed.to(x.dtype)
        # another size: diffusers' rescaled grid (a shape branch, fixed for a captured graph)
        return sincos_positions(self.config.hidden_size, rows, cols, base, x.device).to(x.dtype)

    def _check_inputs(self, x, context) -> None:
        p = self.config.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise ValueError(
                f"input size {h}x{w} is not divisible by the patch size {p}: pad or resize it to "
                f"a multiple of {p}"
            )
        check_context(context, self.config.context_dim)

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
            taps None: [B, in_channels, H, W]. Otherwise {name: [B, N, hidden_size]} for the
            requested taps; no block after the deepest requested tap runs.
        """
        last = len(self.blocks) - 1
        wanted: list[str] = []
        if taps is not None:
            if isinstance(taps, str):
                taps = (taps,)
            unknown = [name for name in taps if name not in self.tap_names]
            if unknown:
                raise ValueError(f"unknown tap(s) {unknown}; valid tap names: {self.tap_names}")
            wanted = list(taps)
            last = max((self.tap_block(name) for name in wanted), default=-1)
        self._check_inputs(x, context)

        out: dict[str, torch.Tensor] = {}
        if last < 0:
            return out
        b, _, h, w = x.shape
        p = self.config.patch_size
        rows, cols = h // p, w // p
        c = self._embed(x, t, labels)
        # [B, D, rows, cols] -> [B, N, D] tokens in row-major order
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self._positions(rows, cols, tokens)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, context)
            for name in wanted:
                if self.tap_block(name) == i:
                    out[name] = tokens
            if taps is not None and i == last:
                return out
        shift, scale = self.adaln_out(F.silu(c)).chunk(2, dim=1)
        y = self.proj_out(modulate(self.norm_out(tokens), shift, scale))
        # [B, N, p * p * C] -> [B, C, H, W]: token (r, q) holds patch pixels (i, j, channel)
        y = y.reshape(b, rows, cols, p, p, self.config.in_channels)
        return y.permute(0, 5, 1, 3, 2, 4).reshape(b, self.config.in_channels, h, w)
