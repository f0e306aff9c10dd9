"""dgfast's own DiT: upstream's module tree and state_dict, dgfast's fused forward.

Module and parameter names match facebookresearch/DiT `models.py` exactly, so an upstream
state_dict (including `pos_embed`) loads unchanged. The forward differs only in *how*:
LayerNorm+modulate, gate+residual+next LayerNorm and GELU run as fused ops (dgfast.ops), the
per-block SiLU(c) is computed once, and attention is one SDPA (or xformers) call.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dgfast import ops

ATTENTION_IMPLS = ("sdpa", "xformers")


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------

def timestep_frequencies(dim: int = 256, max_period: int = 10000, divisor: float | None = None) -> torch.Tensor:
    """DiT's frequencies, computed on the CPU in float32 in upstream's op order
    (docs/upstream_sampling.md, trap 11).

    divisor=None gives DiT's `half`; diffusers' DiT uses `half - 1` (downscale_freq_shift=1).
    """
    half = dim // 2
    div = half if divisor is None else divisor
    steps = torch.arange(start=0, end=half, dtype=torch.float32, device="cpu")  # also under torch.device("meta")
    return torch.exp(-math.log(max_period) * steps / div)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_divisor: float | None = None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_divisor = freq_divisor
        # Computed on CPU once, copied to a device once, as upstream computes and copies per call. Not a
        # buffer: model.to(bfloat16) must not round them.
        self._freqs: dict[torch.device, torch.Tensor] = {
            torch.device("cpu"): timestep_frequencies(frequency_embedding_size, divisor=freq_divisor)}

    def freqs(self, device) -> torch.Tensor:
        device = torch.device(device)
        cached = self._freqs.get(device)
        if cached is None:
            cached = self._freqs[torch.device("cpu")].to(device)
            if not torch.compiler.is_compiling():  # a trace that filled the cache would be retraced at once
                self._freqs[device] = cached
        return cached

    def frequency_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The sinusoidal features (N, frequency_embedding_size), before the MLP."""
        args = t[:, None].float() * self.freqs(t.device)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.from_frequencies(self.frequency_embedding(t))

    def from_frequencies(self, f: torch.Tensor) -> torch.Tensor:
        """The MLP on float32 sinusoidal features, cast to the MLP's dtype (bf16/fp16 models)."""
        return self.mlp(f.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout_prob > 0 else 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.dropout_prob > 0:  # upstream token_drop: consumes RNG, training only
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), row-major tokens


def sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE 2-D sin-cos table (T, D): column coordinate first, sin before cos (float64 → float32)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))

    def one_axis(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    w, h = np.meshgrid(grid_w, grid_h)  # w varies fastest
    return np.concatenate([one_axis(w), one_axis(h)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------

def attention(qkv: torch.Tensor, num_heads: int, impl: str = "sdpa") -> torch.Tensor:
    """Multi-head self-attention from a packed (B, T, 3D) qkv; returns (B, T, D)."""
    B, T, three_d = qkv.shape
    hd = three_d // (3 * num_heads)
    q, k, v = qkv.view(B, T, 3, num_heads, hd).unbind(2)  # (B, T, H, hd) strided views, no copy
    if impl == "xformers" and qkv.is_cuda:
        import xformers.ops as xops
        return xops.memory_efficient_attention(q, k, v).reshape(B, T, -1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).reshape(B, T, -1)


def blocks_forward(h, mods, final, attn, mlp, *, eps: float, mlp_eps: float, backend: str = "auto"):
    """The adaLN-Zero block stack, shared by DiT.run_blocks and the paired model (dgfast.paired).

    h: (N, T, D) tokens; mods[i]: block i's six (N, D) chunks (shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp); final: the final layer's (shift, scale);
    attn(i, xm) / mlp(i, xm): block i's sub-layer on its modulated input (N, T, D).
    The gate+residual of one sub-layer is fused with the LayerNorm-modulate of the next one
    (across block boundaries too). Returns the final layer's modulated input (N, T, D).
    """
    first = mods[0][:2] if mods else final
    xm = ops.adaln_modulate(h, first[0], first[1], eps=eps, backend=backend)
    for i, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) in enumerate(mods):
        h, xm = ops.gated_residual_modulate(h, gate_msa, attn(i, xm), shift_mlp, scale_mlp, eps=mlp_eps,
                                            backend=backend)
        nxt_shift, nxt_scale = mods[i + 1][:2] if i + 1 < len(mods) else final
        h, xm = ops.gated_residual_modulate(h, gate_mlp, mlp(i, xm), nxt_shift, nxt_scale, eps=eps,
                                            backend=backend)
    return xm


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(N, T, p*p*c) → (N, c, H, W), channel fastest within a token (upstream order)."""
    g = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], g, g, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(self.qkv(x), self.num_heads, self.impl))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ops.gelu_tanh(self.fc1(x), backend=self.backend))


class DiTBlock(nn.Module):
    """adaLN-Zero block. Its forward lives in DiT.forward so that the gate+residual of one
    sub-layer fuses with the LayerNorm-modulate of the next (across block boundaries too)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))


class DiT(nn.Module):
    """Diffusion transformer, state_dict-compatible with upstream DiT.

    `norm_eps` / `mlp_norm_eps` / `freq_divisor` exist for converted diffusers models, which
    keep diffusers' own numerics (1e-5 pre-MLP LayerNorm eps, /127 timestep frequencies).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, *,
                 norm_eps: float = 1e-6, mlp_norm_eps: float = 1e-6, freq_divisor: float | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                           norm_eps=norm_eps, mlp_norm_eps=mlp_norm_eps, freq_divisor=freq_divisor)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_heads, self.num_classes, self.hidden_size = num_heads, num_classes, hidden_size
        self.norm_eps, self.mlp_norm_eps = norm_eps, mlp_norm_eps
        self.backend = "auto"

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_divisor=freq_divisor)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def num_table_rows(self) -> int:
        return self.y_embedder.embedding_table.num_embeddings

    def initialize_weights(self):
        """Upstream's init (xavier Linears, zeroed adaLN and output), so training from scratch matches."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        self.apply(_basic)
        table = sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)
        self.pos_embed.data.copy_(torch.from_numpy(table).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.constant_(lin.weight, 0)
            nn.init.constant_(lin.bias, 0)

    def set_attention(self, impl: str):
        """'sdpa' (default, any device) or 'xformers' (CUDA with xformers' C++ library)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if impl == "xformers":
            try:
                import xformers
                ok = bool(getattr(xformers, "_has_cpp_library", False))
            except ImportError:
                ok = False
            if not ok:
                raise RuntimeError("attention='xformers': xformers with its C++/CUDA library is not available")
        for block in self.blocks:
            block.attn.impl = impl
        return self

    def set_backend(self, backend: str):
        """Which implementation the fused elementwise ops use (see dgfast.ops)."""
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        for block in self.blocks:
            block.mlp.backend = backend
        return self

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def embed(self, x, t, y):
        """Token embeddings h (N, T, D) and conditioning c (N, D)."""
        h = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype)) + self.pos_embed  # bf16/fp16 models
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return h, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x, t, y)
        return self.unpatchify(self.run_blocks(h, c))

    def run_blocks(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Blocks + final layer with fused LN-modulate / gated-residual ops; returns (N, T, p*p*O)."""
        silu_c = F.silu(c)  # identical for every block: compute once
        final = self.final_layer.adaLN_modulation[1](silu_c).chunk(2, dim=1)  # shift, scale
        mods = [blk.adaLN_modulation[1](silu_c).chunk(6, dim=1) for blk in self.blocks]
        # Sub-layers go through the modules, so wrapped Linears (peft LoRA, hooks) keep working.
        xm = blocks_forward(h, mods, final, lambda i, z: self.blocks[i].attn(z), lambda i, z: self.blocks[i].mlp(z),
                            eps=self.norm_eps, mlp_eps=self.mlp_norm_eps, backend=self.backend)
        return self.final_layer.linear(xm)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Upstream's classifier-free guidance forward (3-channel quirk included)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        g = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([g, g], dim=0), rest], dim=1)


# Upstream's model zoo names and sizes.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def _factory(size: str, patch: int):
    depth, hidden, heads = _SIZES[size]

    def build(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)
    build.__name__ = f"DiT_{size}_{patch}"
    return build


DiT_models = {f"DiT-{s}/{p}": _factory(s, p) for s in _SIZES for p in (2, 4, 8)}


def build_model(name: str, **kwargs) -> DiT:
    """DiT_models[name](**kwargs) with a clear error for unknown names."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(DiT_models)}")
    return DiT_models[name](**kwargs)
