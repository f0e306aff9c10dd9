"""Paired execution: the fine-tuned and the pre-trained DiT as one model over one batch.

Every DoG step evaluates two transformers on the same x_t and t. `pair(ft, pre)` runs both
over the concatenated batch [x; x] (2n rows, fine-tuned rows first) and decides, layer by
layer and once, how each layer runs:

  shared             identical weights (same storage, or equal values): one GEMM over 2n rows.
  stacked            different weights: one batched GEMM (baddbmm over (2, out, in) stacked
                     weights: one launch instead of two). On CPU the MLP runs instead as two
                     oneDNN GEMMs with fc1's bias and GELU fused into the GEMM (oneDNN outran
                     MKL here; bench/RESULTS.md). `gemm=` overrides the choice.
  lora               a peft LoRA layer on the fine-tuned side over a base equal to the
                     pre-trained weights: the base GEMM once over 2n rows, the low-rank delta on
                     the fine-tuned rows only. The base weights exist once.
  stacked+lora       LoRA over a base that differs from the pre-trained layer: stacked + delta.
  shared-activation  patch embedding, pos_embed and timestep embedding whose weights match: the
                     inputs (x_t, t) are the same for both halves, so they run once on n rows.
  separate           each model's own module on its own rows: the label tables (y vs the null
                     label always differ) and anything the pair does not understand (LoRA
                     variants such as DoRA, hooked modules, non-Linear replacements).

Attention runs both halves in one SDPA call (batch 2n). The elementwise work between GEMMs is
the fused ops of dgfast.ops in the same block loop as DiT.run_blocks (models.blocks_forward).

Memory: shared and LoRA layers use the models' own tensors (one copy of a shared base). Layers
whose weights differ cost a copy of both weights under the default gemm ("bmm": stacked
(2, out, in) copies, all blocks' adaLN concatenated into one; "onednn": the same for attention
and adaLN, oneDNN-prepacked copies for the MLP) -- for a full fine-tune that is as much again
as both models. `report()` lists the bytes per layer; gemm="mm" allocates nothing.
A pair reuses its sub-layer output buffers call after call: one forward_pair at a time per pair.
`dgfast.pair_cache.get_pair(ft, pre)` caches one pair per model pair and rebuilds it when a
weight changed; `dgfast.cuda_graph` replays a whole step (paired forward + update) as a CUDA graph.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dgfast.models import DiT, blocks_forward, unpatchify

KINDS = ("shared", "stacked", "lora", "stacked+lora", "shared-activation", "separate")
_ARCH_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
              "learn_sigma", "norm_eps", "mlp_norm_eps")


# ----------------------------------------------------------------------------------------------
# What a layer is made of
# ----------------------------------------------------------------------------------------------

def _is_lora(mod) -> bool:
    if "peft" not in sys.modules:  # no peft layer can exist; importing peft (and transformers) costs seconds
        return False
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(mod, LoraLayer)


def _hooked(mod) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


@dataclass
class _Parts:
    """A Linear/Conv2d as base weight + bias + active vanilla LoRA adapters."""
    base: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    loras: list = field(default_factory=list)  # (lora_A module, lora_B module, scaling)


def _parts(mod, base_type) -> _Parts | None:
    """mod as _Parts, or None when its forward is something else (then it runs as 'separate')."""
    if _hooked(mod):
        return None
    if type(mod) is base_type:
        return _Parts(mod, mod.weight, mod.bias)
    if not _is_lora(mod):
        return None
    base = mod.get_base_layer()
    if type(base) is not base_type or _hooked(base) or (mod.disable_adapters and mod.merged):
        return None
    parts = _Parts(base, base.weight, base.bias)
    if mod.disable_adapters or mod.merged:  # peft runs base_layer alone (merged: delta is in the base)
        return parts
    for name in mod.active_adapters:
        if name not in mod.lora_A.keys():
            continue
        if name in getattr(mod, "lora_variant", {}) or mod.use_dora.get(name, False):
            return None  # DoRA and friends: not base + B(A(x)) * s
        A, B, drop = mod.lora_A[name], mod.lora_B[name], mod.lora_dropout[name]
        if A.weight.dtype != base.weight.dtype or (drop.training and getattr(drop, "p", 0) > 0):
            return None
        parts.loras.append((A, B, float(mod.scaling[name])))
    return parts


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same storage, or equal values (checked once, at pairing)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _param_bytes(mod: nn.Module) -> int:
    return _nbytes(*mod.parameters())


# ----------------------------------------------------------------------------------------------
# One Linear of both models
# ----------------------------------------------------------------------------------------------

GEMMS = ("bmm", "onednn", "mm")


def _onednn_linear(x, w, b, gelu: bool):
    """x @ w.T + b (then tanh-GELU) as one oneDNN primitive: the bias and the GELU run in the
    GEMM's epilogue, so neither costs a pass over the output (ATen's addmm/baddbmm first copy the
    broadcast bias into the output, and GELU is a separate pass). On this machine's AMD CPU
    oneDNN's fp32 GEMM also measured ~20% faster than MKL's (bench/RESULTS.md)."""
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_available(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _whole(x):
    return torch.cat(x) if isinstance(x, tuple) else x


class PairLinear:
    """One Linear of both models over the 2M input rows, the fine-tuned model's M rows first.

    gemm: how a stacked (different-weights) layer runs --
      "bmm":    one baddbmm over a stacked (2, out, in) copy of both weights (one launch);
      "onednn": two oneDNN GEMMs, one per half, bias (and GELU) fused, on prepacked copies of
                the two weights (CPU);
      "mm":     two GEMMs written into the halves of one buffer, on the models' own weights.
    Shared layers run one GEMM over all 2M rows (oneDNN when gemm="onednn", else F.linear).
    """

    def __init__(self, name: str, ft_mod: nn.Module, pre_mod: nn.Module, gemm: str = "mm"):
        self.name, self.gemm = name, gemm
        f, p = _parts(ft_mod, nn.Linear), _parts(pre_mod, nn.Linear)
        self.bytes_two = _param_bytes(ft_mod) + _param_bytes(pre_mod)
        self.extra = 0
        self.loras = []
        self.stacked = False
        self.w2t = self.b2 = self.packed = None
        if f is None or p is None or p.loras:
            self.kind, self.ft_mod, self.pre_mod = "separate", ft_mod, pre_mod
            self.in_features = getattr(ft_mod, "in_features", None)
            self.bytes_used = self.bytes_two
            self.note = "module calls (a wrapper the pair does not fuse)"
            return
        self.out_features, self.in_features = f.weight.shape
        self.loras = [(A.weight.t(), B.weight.t(), B.bias, s) for A, B, s in f.loras]  # transposed views
        lora_bytes = sum(_nbytes(A.weight, B.weight, B.bias) for A, B, _ in f.loras)
        if _same(f.weight, p.weight) and _same(f.bias, p.bias):
            self.kind = "lora" if f.loras else "shared"
            self.weight, self.bias = f.weight, f.bias  # the fine-tuned model's own tensors: no copy
            self.bytes_used = _nbytes(f.weight, f.bias) + lora_bytes
            self.note = "base once over 2n rows + delta on fine-tuned rows" if f.loras else "one GEMM over 2n rows"
            return
        self.kind = "stacked+lora" if f.loras else "stacked"
        self.bytes_used = _nbytes(f.weight, f.bias, p.weight, p.bias) + lora_bytes
        self.weights, self.biases = (f.weight, p.weight), (f.bias, p.bias)  # the models' own tensors
        self.note = {"onednn": "two oneDNN GEMMs (bias, GELU fused) on prepacked copies",
                     "mm": "two GEMMs into one output, no weight copy"}.get(gemm, "")
        if gemm == "bmm":
            self.make_stacked()
        elif gemm == "onednn":
            # oneDNN's blocked layout, made once: packing per call (what a plain weight costs)
            # measured ~10% of these GEMMs. A copy of both weights, like stacking.
            with torch.no_grad():
                self.packed = tuple(torch.ops.mkldnn._reorder_linear_weight(w.detach()) for w in self.weights)
            self.extra = _nbytes(*self.weights)

    def make_stacked(self):
        """One baddbmm over a (2, out, in) copy, used as its (2, in, out) transposed view (baddbmm
        reads W^T directly). The models keep their own weights: this is extra memory."""
        self.w2t = torch.stack(self.weights).transpose(1, 2)
        self.b2 = None if self.biases[0] is None else torch.stack(self.biases).unsqueeze(1)  # (2, 1, out)
        self.stacked, self.gemm, self.packed = True, "bmm", None
        self.extra = _nbytes(self.w2t, self.b2)
        self.note = "one baddbmm over a stacked (2,out,in) copy"

    def __call__(self, x, shape=None, *, gelu: bool = False, halves: bool = False, backend: str = "auto",
                 workspace=None):
        """x: the 2M input rows -- one contiguous tensor (any leading shape, rows in order) or a
        (fine-tuned, pre-trained) pair of halves. gelu: apply tanh-GELU to the output (fused into
        oneDNN's epilogue when possible). Returns the output viewed as (*shape, out) (shape None:
        as the GEMM left it), or the pair of halves when halves=True and the GEMMs made halves.
        Reshapes that are already in place are skipped: every view is a dispatched op.
        workspace(shape) -> a reusable buffer for the output of a baddbmm or a concatenation
        (the caller guarantees the previous contents are dead)."""
        kind, n_in = self.kind, self.in_features
        # GELU in oneDNN's epilogue only where a oneDNN GEMM makes the whole output: not after a LoRA
        # delta, not for "separate" layers (plain module calls, e.g. DoRA or a hooked fc1)
        fuse = gelu and self.gemm == "onednn" and not self.loras and kind != "separate"
        if kind == "shared" or kind == "lora":
            x = _whole(x)
            if x.shape[-1] != n_in:
                x = x.reshape(2, -1, n_in)
            if self.gemm == "onednn":                  # one GEMM over all 2M rows
                out = _onednn_linear(x, self.weight, self.bias, fuse)
            else:
                out = F.linear(x, self.weight, self.bias)
            if self.loras:
                self._add_lora(x.view(2, -1, n_in).unbind(0)[0], out.view(2, -1, self.out_features).unbind(0)[0])
        elif kind == "separate" or self.gemm == "onednn":
            if isinstance(x, tuple):
                xa, xb = x
            else:                                      # (2n, ...) -> its fine-tuned and pre-trained halves
                xa, xb = (x if x.shape[-1] == n_in else x.flatten(2)).chunk(2)
            if kind == "separate":
                ya, yb = self.ft_mod(xa), self.pre_mod(xb)
            else:
                ya = _onednn_linear(xa, self.packed[0], self.biases[0], fuse)
                yb = _onednn_linear(xb, self.packed[1], self.biases[1], fuse)
                if self.loras:
                    self._add_lora(xa, ya)
            if gelu and not fuse:
                ya, yb = _gelu(ya, backend), _gelu(yb, backend)
                gelu = False
            if halves:
                return ya, yb
            out = torch.cat([ya, yb]) if workspace is None else \
                torch.cat([ya, yb], out=workspace((ya.shape[0] * 2, *ya.shape[1:])))
        else:
            x = _whole(x)
            x2 = x if x.dim() == 3 and x.shape[0] == 2 and x.shape[2] == n_in \
                else x.reshape(2, -1, n_in)            # (2, M, in): [fine-tuned rows; pre-trained rows]
            if self.stacked:
                buf = None if workspace is None else workspace((2, x2.shape[1], self.out_features))
                out = torch.baddbmm(self.b2, x2, self.w2t, out=buf) if self.b2 is not None else \
                    torch.bmm(x2, self.w2t, out=buf)
            else:
                # Two GEMMs straight into the halves of one buffer: no torch.cat copy afterwards.
                out = x.new_empty(2, x2.shape[1], self.out_features)
                for xi, oi, w, b in zip(x2.unbind(0), out.unbind(0), self.weights, self.biases):
                    if b is not None:
                        torch.addmm(b, xi, w.t(), out=oi)
                    else:
                        torch.mm(xi, w.t(), out=oi)
            if self.loras:
                self._add_lora(x2[0], out[0])
        if gelu and not fuse:
            out = _gelu(out, backend)
        if shape is not None and tuple(out.shape[:-1]) != tuple(shape):
            out = out.view(*shape, -1)
        return out

    def _add_lora(self, x_ft, out_ft):
        """peft's result + B(A(x)) * s, on the fine-tuned rows only, in place."""
        x_ft = x_ft.reshape(-1, self.in_features)
        o = out_ft.view(-1, self.out_features)
        for At, Bt, b_B, s in self.loras:
            o.addmm_(torch.mm(x_ft, At), Bt, alpha=s)
            if b_B is not None:
                o.add_(b_B, alpha=s)

    def tensors(self):
        """The tensors this object holds (for memory accounting)."""
        if self.kind == "separate":
            return list(self.ft_mod.parameters()) + list(self.pre_mod.parameters())
        held = [t for lo in self.loras for t in lo[:3] if t is not None]
        if self.kind in ("shared", "lora"):
            return held + [t for t in (self.weight, self.bias) if t is not None]
        return held + [t for t in (self.w2t, self.b2, *self.weights, *self.biases) if t is not None]


class AdaLNGroup:
    """Every stacked adaLN Linear (all blocks + final layer) as one baddbmm: they all read the
    same SiLU(c), so their stacked weights are concatenated along `out` once, at pairing (the
    copy stacking makes anyway), and one launch yields all blocks' shift/scale/gate rows."""

    def __init__(self, layers: list[tuple[int, PairLinear]]):
        self.index = [i for i, _ in layers]
        self.sizes = [pl.out_features for _, pl in layers]
        pls = [pl for _, pl in layers]
        w = torch.stack([torch.cat([pl.weights[i] for pl in pls]) for i in (0, 1)])
        self.w2t = w.transpose(1, 2)                                          # (2, D, sum out)
        self.b2 = torch.stack([torch.cat([pl.biases[i] for pl in pls]) for i in (0, 1)]).unsqueeze(1)
        for pl in pls:  # the group computes these layers; each row reports its share of the copy
            pl.extra = 2 * _nbytes(pl.weights[0], pl.biases[0])
            pl.note = "in one baddbmm with all stacked adaLN layers (concatenated stacked copy)"

    def __call__(self, silu_c: torch.Tensor, D: int) -> dict[int, tuple]:
        N = silu_c.shape[0]
        out = torch.baddbmm(self.b2, silu_c.view(2, N // 2, D), self.w2t)   # (2, n, sum out)
        rows = out.view(N, -1, D).unbind(1)                                  # (N, D) views, no copies
        chunks, k = {}, 0
        # out is (2, n, S) = (2n, S) row-major, so row r of the 2n batch is [ft rows; pre rows].
        for i, size in zip(self.index, self.sizes):
            chunks[i] = rows[k:k + size // D]
            k += size // D
        return chunks

    def tensors(self):
        return [self.w2t, self.b2]


# ----------------------------------------------------------------------------------------------
# The paired model
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerRow:
    name: str
    kind: str
    bytes_two_models: int  # weight bytes of this layer in the two models, counted separately
    bytes_used: int        # weight bytes the paired forward reads (a shared weight counted once)
    bytes_extra: int       # bytes the pair itself allocated (stacked copies)
    note: str = ""


def default_gemm(weight: torch.Tensor) -> str:
    """CUDA: "bmm" -- one baddbmm launch instead of two GEMMs (launches are the cost there).
    CPU (float32, torch with oneDNN): "onednn" -- the MLP as per-half oneDNN GEMMs with fused
    bias/GELU, attention as stacked baddbmm; measured fastest here (bench/RESULTS.md)."""
    if weight.device.type == "cuda":
        return "bmm"
    return "onednn" if onednn_available(weight) else "mm"


class PairedDiT:
    """Both models as one: `forward_pair(x, t, y, null_label) -> (out_ft, out_pre)`.

    Build with `dgfast.pair(finetuned, pretrained)` or the cached `get_pair`. Holds the two
    models' submodules and tensors, never the top-level modules themselves (so the cache in
    get_pair does not keep the models alive).
    """

    def __init__(self, finetuned: DiT, pretrained: DiT, *, gemm: str = "auto"):
        for name, m in (("finetuned", finetuned), ("pretrained", pretrained)):
            if not isinstance(m, DiT):
                raise TypeError(f"pair: {name} must be a dgfast DiT, got {type(m).__name__}; convert upstream "
                                f"DiT modules, state_dicts and diffusers DiTTransformer2DModel with dgfast.to_dgfast")
        why = pair_mismatch(finetuned, pretrained)
        if why:
            raise ValueError(f"pair: the two models cannot run as one batch: {why}")
        ft, pre = finetuned, pretrained
        p0 = next(ft.parameters())
        if gemm not in ("auto",) + GEMMS:
            raise ValueError(f"pair: gemm must be 'auto' or one of {GEMMS}, got {gemm!r}")
        if gemm == "onednn" and not onednn_available(p0):
            raise ValueError("pair: gemm='onednn' needs float32 CPU weights and torch built with oneDNN")
        self.gemm = default_gemm(p0) if gemm == "auto" else gemm
        self._ft_ref = weakref.ref(ft)  # settings (backend, attention impl) are read per call
        self._graphs: dict = {}  # captured CUDA graphs per shape (run_cuda_graph)
        self._null_rows: dict = {}  # the pre-trained model's null-label embedding, per (label, device)
        self._buffers: dict = {}    # reused sub-layer outputs, per (role, shape) (forward_pair)
        self.num_heads, self.patch_size, self.out_channels = ft.num_heads, ft.patch_size, ft.out_channels
        self.norm_eps, self.mlp_norm_eps = ft.norm_eps, ft.mlp_norm_eps
        self.backend, self.attn_impl = ft.backend, ft.blocks[0].attn.impl if len(ft.blocks) else "sdpa"
        rows: list[LayerRow] = []

        # --- patch embedding: x_t is the same for both halves --------------------------------------
        fe, pe = _parts(ft.x_embedder.proj, nn.Conv2d), _parts(pre.x_embedder.proj, nn.Conv2d)
        two = _param_bytes(ft.x_embedder) + _param_bytes(pre.x_embedder)
        if fe is not None and pe is not None and not pe.loras and _same(fe.weight, pe.weight) \
                and _same(fe.bias, pe.bias) and _same_conv(fe.base, pe.base):
            self.x_kind = "lora" if fe.loras else "shared-activation"
            self.x_conv, self.x_loras = fe.base, fe.loras
            used = _nbytes(fe.weight, fe.bias) + sum(_param_bytes(A) + _param_bytes(B) for A, B, _ in fe.loras)
            note = "conv once on n rows" + (" + delta on fine-tuned rows" if fe.loras else "")
        else:
            self.x_kind, used, note = "separate", two, "each model's conv on n rows"
            if _hooked(ft.x_embedder) or _hooked(pre.x_embedder):
                raise ValueError("pair: hooks on x_embedder itself are not supported (hook x_embedder.proj)")
        self.x_embedders = (ft.x_embedder, pre.x_embedder)
        rows.append(LayerRow("x_embedder.proj", self.x_kind, two, used, 0, note))

        # --- pos_embed ------------------------------------------------------------------------------
        self.pos = (ft.pos_embed, pre.pos_embed)
        self.pos_shared = _same(ft.pos_embed, pre.pos_embed)
        pos_two = _nbytes(*self.pos)
        rows.append(LayerRow("pos_embed", "shared-activation" if self.pos_shared else "separate", pos_two,
                             pos_two // 2 if self.pos_shared else pos_two, 0,
                             "added once on n rows" if self.pos_shared else "each model's table"))

        # --- timestep embedding: t is the same for both halves --------------------------------------
        self.t_embedders = (ft.t_embedder, pre.t_embedder)
        t_parts = [(_parts(ft.t_embedder.mlp[i], nn.Linear), _parts(pre.t_embedder.mlp[i], nn.Linear)) for i in (0, 2)]
        self.t_shared = (ft.t_embedder.freq_divisor == pre.t_embedder.freq_divisor
                         and ft.t_embedder.frequency_embedding_size == pre.t_embedder.frequency_embedding_size
                         and not _hooked(ft.t_embedder) and not _hooked(pre.t_embedder)
                         and not _hooked(ft.t_embedder.mlp) and not _hooked(pre.t_embedder.mlp)
                         and all(a is not None and b is not None and not a.loras and not b.loras
                                 and _same(a.weight, b.weight) and _same(a.bias, b.bias) for a, b in t_parts))
        # The sinusoid depends on t and the frequency table only: shared whenever those match.
        self.t_freq_shared = (ft.t_embedder.freq_divisor == pre.t_embedder.freq_divisor
                              and ft.t_embedder.frequency_embedding_size == pre.t_embedder.frequency_embedding_size
                              and not _hooked(ft.t_embedder) and not _hooked(pre.t_embedder))
        for i in (0, 2):
            two = _param_bytes(ft.t_embedder.mlp[i]) + _param_bytes(pre.t_embedder.mlp[i])
            rows.append(LayerRow(f"t_embedder.mlp.{i}", "shared-activation" if self.t_shared else "separate",
                                 two, two // 2 if self.t_shared else two, 0,
                                 "once on n rows" if self.t_shared else
                                 "each model's MLP" + (" (sinusoid once)" if self.t_freq_shared else "")))

        # --- label tables: y vs null always differ --------------------------------------------------
        self.y_embedders = (ft.y_embedder, pre.y_embedder)
        two = _param_bytes(ft.y_embedder) + _param_bytes(pre.y_embedder)
        rows.append(LayerRow("y_embedder.embedding_table", "separate", two, two, 0,
                             "labels y vs null: each model's table"))

        # --- blocks and final layer -----------------------------------------------------------------
        def lin(name, get, gemm=self.gemm):
            return PairLinear(name, get(ft), get(pre), gemm)

        def block_mod(i, path):
            return lambda m: m.blocks[i].get_submodule(path)

        self.blocks = [{key: lin(f"blocks.{i}.{path}", block_mod(i, path), "mm" if key == "ada" else self.gemm)
                        for key, path in (("ada", "adaLN_modulation.1"), ("qkv", "attn.qkv"), ("proj", "attn.proj"),
                                          ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))} for i in range(len(ft.blocks))]
        self.final_ada = lin("final_layer.adaLN_modulation.1", lambda m: m.final_layer.adaLN_modulation[1], "mm")
        self.final_linear = lin("final_layer.linear", lambda m: m.final_layer.linear)
        # adaLN: every block's modulation reads the same SiLU(c) (n rows: tiny GEMMs), so all the
        # stacked ones run as one baddbmm over a concatenated copy -- one op instead of one per block.
        # gemm="mm" is the zero-copy mode: there they stay two GEMMs each.
        ada = [(i, blk["ada"]) for i, blk in enumerate(self.blocks)] + [(len(self.blocks), self.final_ada)]
        grouped = [(i, pl) for i, pl in ada if pl.kind == "stacked" and pl.biases[0] is not None]
        self.ada_group = AdaLNGroup(grouped) if self.gemm != "mm" and len(grouped) > 1 else None
        if self.gemm == "onednn":
            # The attention layers stay stacked baddbmms on CPU too: SDPA wants one (2n, T, 3D) qkv
            # tensor and hands back one (2n, T, D), which baddbmm reads and writes as views, where
            # per-half GEMMs need a concatenation -- an extra read+write pass that, on this memory-
            # starved machine, cost more than oneDNN's faster GEMM saved (and two more ops per layer).
            # The MLP is where oneDNN pays: fc1's bias and GELU run in the GEMM's epilogue, and its
            # two halves feed fc2's two GEMMs directly (bench/RESULTS.md).
            for blk in self.blocks:
                for key in ("qkv", "proj"):
                    if blk[key].kind == "stacked":
                        blk[key].make_stacked()
        if self.gemm == "bmm":
            for i, pl in ada:
                if pl.kind.startswith("stacked") and not any(pl is q for _, q in grouped):
                    pl.make_stacked()
        for pl in [lin for blk in self.blocks for lin in blk.values()] + [self.final_ada, self.final_linear]:
            rows.append(LayerRow(pl.name, pl.kind, pl.bytes_two, pl.bytes_used, pl.extra, pl.note))
        self.rows = rows

        # Everything the models hold that the rows above do not cover (wrappers' extra parameters).
        covered = {id(t) for t in self._row_params(ft, pre)}
        self.uncovered = [n for m, tag in ((ft, "finetuned"), (pre, "pretrained"))
                          for n, p in m.named_parameters() if id(p) not in covered]

    @staticmethod
    def _row_params(ft, pre):
        for m in (ft, pre):
            yield from m.x_embedder.parameters()
            yield m.pos_embed
            yield from m.t_embedder.parameters()
            yield from m.y_embedder.parameters()
            yield from m.blocks.parameters()
            yield from m.final_layer.parameters()

    # -- settings ---------------------------------------------------------------------------------

    def _settings(self):
        ft = self._ft_ref()
        if ft is not None:  # follow set_backend / set_attention made after pairing
            self.backend = ft.backend
            if len(ft.blocks):
                self.attn_impl = ft.blocks[0].attn.impl
        return self.backend, self.attn_impl

    # -- forward ----------------------------------------------------------------------------------

    def __call__(self, x, t, y, null_label=1000, backend=None):
        return self.forward_pair(x, t, y, null_label, backend=backend)

    @torch.inference_mode()
    def forward_pair(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null_label=1000, backend=None):
        """(out_ft, out_pre): finetuned(x, t, y) and pretrained(x, t, null_label), one 2n batch.

        x (n, C, H, W), t (n,), y (n,) int64; null_label an int or an (n,) tensor.
        backend: the fused ops' implementation for this call (None: the fine-tuned model's setting).
        Outputs are inference tensors (computed under torch.inference_mode).
        """
        own, impl = self._settings()
        backend = own if backend is None else backend
        n = x.shape[0]
        h = self._embed_tokens(x)                         # (2n, T, D): fine-tuned rows first
        c = self._embed_cond(t, y, null_label, n)         # (2n, D)
        N, T, D = h.shape
        H = self.num_heads
        silu_c = F.silu(c)                                # read by every adaLN GEMM
        mods, final = self._modulation(silu_c, D)
        blocks = self.blocks

        def ws(role):
            # Sub-layer outputs go to buffers reused block after block: each is dead once the next
            # op has read it (SDPA reads qkv; the residual op reads proj / fc2). A fresh multi-MB
            # tensor per call costs page faults on first touch -- on this VM a large share of
            # every eager op's time (see "Fused ops (CPU)" in bench/RESULTS.md).
            return lambda shape: self._workspace(role, shape, h)

        def attn(i, xm):
            qkv = blocks[i]["qkv"](xm, (N, T, 3, H), workspace=ws("qkv"))  # (2n, T, 3, H, hd): one SDPA
            if impl == "xformers" and qkv.is_cuda:
                import xformers.ops as xops
                q, k, v = qkv.unbind(2)                   # (2n, T, H, hd): xformers' layout, strided views
                o = xops.memory_efficient_attention(q, k, v)
            else:
                # q, k, v as strided (2n, H, T, hd) views of qkv: no permute copy. One SDPA over both
                # halves (batch 2n); its output is (2n, T, H, hd)-contiguous after the transpose.
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
            return blocks[i]["proj"](o, (N, T), workspace=ws("proj"))  # o read as (2, nT, D): a view

        def mlp(i, xm):
            # fc1's output (GELU applied, fused into oneDNN's epilogue on CPU) goes to fc2 as the
            # GEMMs left it: per-half outputs stay halves, no concatenation in between.
            z = blocks[i]["fc1"](xm, gelu=True, halves=True, backend=backend)
            return blocks[i]["fc2"](z, (N, T), workspace=ws("fc2"))

        xm = blocks_forward(h, mods, final, attn, mlp, eps=self.norm_eps, mlp_eps=self.mlp_norm_eps,
                            backend=backend)
        out = self._unpatchify(self.final_linear(xm, (N, T)))
        return out[:n], out[n:]

    def _workspace(self, role, shape, like):
        key = (role, tuple(shape), like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _modulation(self, silu_c, D):
        """Every block's six (2n, D) adaLN chunks and the final layer's two."""
        grouped = self.ada_group(silu_c, D) if self.ada_group is not None else {}
        N = silu_c.shape[0]
        mods = [grouped[i] if i in grouped else blk["ada"](silu_c, (N,)).chunk(6, dim=1)
                for i, blk in enumerate(self.blocks)]
        final = grouped.get(len(self.blocks)) or self.final_ada(silu_c, (N,)).chunk(2, dim=1)
        return mods, final

    def _embed_tokens(self, x):
        n = x.shape[0]
        x = x.to(self.x_embedders[0].proj.weight.dtype)  # bf16/fp16 models: the sampler's x is float32
        if self.x_kind == "separate":                     # each model's conv; both halves at once below
            e = torch.cat([self.x_embedders[0].proj(x), self.x_embedders[1].proj(x)])
        else:
            e = self.x_conv(x)                            # once for n rows: same x_t, same weights
            if self.x_loras:                              # peft's base(x) + B(A(x)) * s, fine-tuned only
                e_ft = e
                for A, B, s in self.x_loras:
                    e_ft = e_ft + B(A(x)) * s
                e = torch.cat([e_ft, e])
        e = e.flatten(2).transpose(1, 2)                  # (rows, T, D), row-major tokens
        pos_ft, pos_pre = self.pos
        if self.pos_shared:
            h = e + pos_ft
            return torch.cat([h, h]) if len(e) == n else h  # shared activation: broadcast to 2n rows
        e_ft, e_pre = (e, e) if len(e) == n else e.chunk(2)
        return torch.cat([e_ft + pos_ft, e_pre + pos_pre])

    def _embed_cond(self, t, y, null_label, n):
        t_ft_mod, t_pre_mod = self.t_embedders
        if self.t_shared:                                 # once for n rows
            t_ft = t_pre = t_ft_mod(t)
        elif self.t_freq_shared:                          # the sinusoid once, each model's MLP
            f = t_ft_mod.frequency_embedding(t)
            t_ft, t_pre = t_ft_mod.from_frequencies(f), t_pre_mod.from_frequencies(f)
        else:
            t_ft, t_pre = t_ft_mod(t), t_pre_mod(t)
        y_ft = self.y_embedders[0](y, False)
        if isinstance(null_label, torch.Tensor):
            y_pre = self.y_embedders[1](null_label.to(y.device).expand(n), False)
        else:  # one table row, broadcast over the n rows; looked up once per label and device
            key = (int(null_label), y.device)
            if key not in self._null_rows:
                with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable outside inference mode
                    self._null_rows[key] = self.y_embedders[1](
                        torch.full((1,), key[0], dtype=torch.long, device=y.device), False)
            y_pre = self._null_rows[key]
        return torch.cat([t_ft + y_ft, t_pre + y_pre])    # upstream's c = t_emb + y_emb

    def _unpatchify(self, z):
        return unpatchify(z, self.patch_size, self.out_channels)

    # -- report -----------------------------------------------------------------------------------

    def kinds(self) -> dict[str, str]:
        """{layer name: kind} for every layer (upstream state_dict names, without .weight/.bias)."""
        return {r.name: r.kind for r in self.rows}

    def memory(self) -> dict[str, int]:
        """Weight bytes: two separate models vs what the paired forward uses and holds."""
        return dict(two_models=sum(r.bytes_two_models for r in self.rows),
                    used=sum(r.bytes_used for r in self.rows),
                    extra=sum(r.bytes_extra for r in self.rows))

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor the pair references (its own copies included)."""
        out = [*self.pos]
        for pl in [lin for blk in self.blocks for lin in blk.values()] + [self.final_ada, self.final_linear]:
            out += pl.tensors()
        for m in (*self.x_embedders, *self.t_embedders, *self.y_embedders):
            out += list(m.parameters())
        if self.ada_group is not None:
            out += self.ada_group.tensors()
        return out  # (oneDNN's prepacked weights are opaque tensors: counted in memory()["extra"] only)

    def report(self) -> str:
        """Per layer: kind and weight bytes, two separate models vs the pair; totals."""
        mib = 1 << 20
        width = max(len(r.name) for r in self.rows)
        lines = [f"{'layer':<{width}}  {'kind':<17} {'2 models MiB':>12} {'pair uses':>10} {'pair copy':>10}  note"]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {r.kind:<17} {r.bytes_two_models / mib:12.3f} "
                         f"{r.bytes_used / mib:10.3f} {r.bytes_extra / mib:10.3f}  {r.note}")
        mem = self.memory()
        counts = {k: sum(r.kind == k for r in self.rows) for k in KINDS}
        lines.append("")
        lines.append("layers: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        lines.append(f"weights of two separate models: {mem['two_models'] / mib:.2f} MiB; the paired forward reads "
                     f"{mem['used'] / mib:.2f} MiB and allocated {mem['extra'] / mib:.2f} MiB of its own "
                     f"(gemm={self.gemm!r}: {_GEMM_NOTE[self.gemm]})")
        if self.uncovered:
            lines.append(f"parameters outside these layers (used by the models' own modules): {self.uncovered}")
        return "\n".join(lines)


_GEMM_NOTE = {"bmm": "stacked copies for baddbmm, adaLN concatenated",
              "onednn": "MLP and output layer as per-half oneDNN GEMMs on prepacked copies, attention and "
                        "adaLN as stacked baddbmm",
              "mm": "no copies: stacked layers run as two GEMMs"}


def _same_conv(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    return (a.stride, a.padding, a.dilation, a.groups, a.padding_mode) == \
        (b.stride, b.padding, b.dilation, b.groups, b.padding_mode)


def _gelu(z, backend):
    from dgfast import ops
    return ops.gelu_tanh(z, backend=backend)


# ----------------------------------------------------------------------------------------------
# Building and caching
# ----------------------------------------------------------------------------------------------

def pair_mismatch(ft: DiT, pre: DiT) -> str:
    """Why two dgfast DiTs cannot run as one concatenated batch ('' when they can): a different
    architecture, or weights of another dtype or on another device. Two separate forwards still can."""
    bad = [f"{k} {ft.config[k]!r} vs {pre.config[k]!r}" for k in _ARCH_KEYS if ft.config[k] != pre.config[k]]
    p, q = next(ft.parameters(), None), next(pre.parameters(), None)
    if p is not None and q is not None:
        if p.dtype != q.dtype:
            bad.append(f"weights {p.dtype} vs {q.dtype}")
        if p.device != q.device:
            bad.append(f"weights on {p.device} vs {q.device}")
    return "; ".join(bad)


def pair(finetuned: DiT, pretrained: DiT, *, gemm: str = "auto") -> PairedDiT:
    """A new paired model for (finetuned, pretrained); see the module docstring.

    gemm: how layers whose weights differ run -- "bmm" (one baddbmm over stacked copies; the
    default on CUDA), "onednn" (two oneDNN GEMMs with fused bias/GELU; the default on CPU) or
    "mm" (two GEMMs, no weight copies at all). See PairLinear.
    """
    return PairedDiT(finetuned, pretrained, gemm=gemm)
