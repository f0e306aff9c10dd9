"""The layers of a paired model (dgfast.paired): one Linear of both models over one 2n batch.

`_parts` says what a module is made of (base weight, bias, active vanilla LoRA adapters, or
something the pair does not understand); `PairLinear` runs one Linear of both models under a
named GEMM strategy ("bmm", "onednn", "mm"; dgfast.gemm_choice picks one per layer shape), one
model's side alone (the two-pass path), or as plain functional ops (torch.compile);
`AdaLNGroup` runs every stacked adaLN Linear as one baddbmm.
"""
from __future__ import annotations

import copy
import itertools
import sys
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dgfast import ops
from dgfast.gemm_choice import STRATEGIES, onednn_available

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

GEMMS = STRATEGIES  # ("bmm", "onednn", "mm"): the strategies gemm= may force (dgfast.gemm_choice)


def _onednn_linear(x, w, b, gelu: bool):
    """x @ w.T + b (then tanh-GELU) as one oneDNN primitive: the bias and the GELU run in the
    GEMM's epilogue, so neither costs a pass over the output (ATen's addmm/baddbmm first copy the
    broadcast bias into the output, and GELU is a separate pass)."""
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# A prepacked weight is an opaque torch._mkldnn tensor: dynamo traces mkldnn._linear_pointwise on it,
# but inductor cannot lower that call (LoweringException, torch 2.13), so a compiled graph fell back to
# addmm, 22% slower than the prepacked GEMM on an AVX-512 CPU (bench/RESULTS.md). dgfast::packed_linear
# names the packed weight by a handle instead: inductor keeps it as one opaque call, and the compiled
# pair runs the oneDNN primitive the eager pair measured and chose.
_PACKED: dict = {}            # handle -> prepacked weight (PairLinear.prepare("onednn") registers them)
_HANDLES = itertools.count(1)


def _drop_packed(handles) -> None:
    for h in handles:
        _PACKED.pop(h, None)


@torch.library.custom_op("dgfast::packed_linear", mutates_args=(), device_types="cpu",
                         schema="(Tensor x, Tensor? bias, int handle, int out_features, bool gelu) -> Tensor")
def packed_linear(x: torch.Tensor, bias: Optional[torch.Tensor], handle: int, out_features: int,
                  gelu: bool) -> torch.Tensor:
    """_onednn_linear on the prepacked weight registered as `handle` (x: (M, in); out: (M, out_features))."""
    return _onednn_linear(x, _PACKED[handle], bias, gelu)


@packed_linear.register_fake
def _packed_linear_fake(x, bias, handle, out_features, gelu):
    return x.new_empty((*x.shape[:-1], out_features))


def _whole(x):
    return torch.cat(x) if isinstance(x, tuple) else x


def _halves(x):
    """The (fine-tuned, pre-trained) halves of 2M input rows: a pair as given, or a tensor's
    first-dimension halves (SDPA's (2n, T, H, hd) output flattened to (2n, T, D))."""
    if isinstance(x, tuple):
        return x
    return (x if x.dim() <= 3 else x.flatten(2)).chunk(2)


class PairLinear:
    """One Linear of both models over the 2M input rows, the fine-tuned model's M rows first.

    kind (see the module docstring): "shared" / "lora" (equal base weights), "stacked" /
    "stacked+lora" (different weights) or "separate" (each model's module on its half).
    Every call names its strategy (dgfast.gemm_choice picks it per layer shape):
      "bmm":    one baddbmm over a stacked (2, out, in) copy of both weights (one launch);
      "onednn": two oneDNN GEMMs, one per half, bias (and GELU) fused, on prepacked copies (CPU);
      "mm":     two addmm writing the halves of one buffer, on the models' own weights.
    prepare(strategy) makes the copy a strategy needs. Shared layers run one GEMM over all 2M
    rows (oneDNN for "onednn", else F.linear) on the models' own tensor. `half` runs one model's
    side alone (the two-pass path), `traced` a functional form for torch.compile.
    """

    def __init__(self, name: str, role: str, ft_mod: nn.Module, pre_mod: nn.Module):
        self.name, self.role = name, role
        f, p = _parts(ft_mod, nn.Linear), _parts(pre_mod, nn.Linear)
        self.bytes_two = _param_bytes(ft_mod) + _param_bytes(pre_mod)
        self.loras, self.key, self.shared, self.fed_by = [], None, False, None
        self.w2t = self.b2 = self.packed = self.handles = self.group = None
        if f is None or p is None or p.loras:
            self.kind, self.ft_mod, self.pre_mod = "separate", ft_mod, pre_mod
            self.in_features = getattr(ft_mod, "in_features", None)
            self.bytes_used = self.bytes_two
            return
        self.out_features, self.in_features = f.weight.shape
        self.loras = [(A.weight.t(), B.weight.t(), B.bias, s) for A, B, s in f.loras]  # transposed views
        lora_bytes = sum(_nbytes(A.weight, B.weight, B.bias) for A, B, _ in f.loras)
        self.shared = _same(f.weight, p.weight) and _same(f.bias, p.bias)
        if self.shared:  # the fine-tuned model's own tensors, once
            self.kind = "lora" if f.loras else "shared"
            self.weights, self.biases = (f.weight, f.weight), (f.bias, f.bias)
            self.bytes_used = _nbytes(f.weight, f.bias) + lora_bytes
        else:            # the models' own tensors; copies only when a strategy needs them
            self.kind = "stacked+lora" if f.loras else "stacked"
            self.weights, self.biases = (f.weight, p.weight), (f.bias, p.bias)
            self.bytes_used = _nbytes(f.weight, f.bias, p.weight, p.bias) + lora_bytes
        # what decides the speed of this layer's strategies (the LoRA delta is the same for all)
        self.key = (role, "shared" if self.shared else "stacked", self.in_features, self.out_features,
                    f.bias is not None)

    # -- strategies and their copies -----------------------------------------------------------

    def strategies(self) -> tuple:
        """The strategies this layer can run (none for "separate" layers)."""
        if self.key is None:
            return ()
        one = onednn_available(self.weights[0])
        if self.shared:
            return ("mm", "onednn") if one else ("mm",)
        return ("bmm", "onednn", "mm") if one else ("bmm", "mm")

    def prepare(self, strategy: str):
        """Make the copy `strategy` runs on (stacked layers only): "bmm" a stacked (2, out, in)
        copy read as its (2, in, out) transposed view (baddbmm reads W^T directly); "onednn"
        oneDNN's blocked layout, made once (packing per call measured ~10% of these GEMMs).
        The models keep their own weights: this is extra memory. Copies are normal tensors even
        when made inside inference mode (the first forward)."""
        if self.key is None or self.shared:
            return
        with torch.inference_mode(False), torch.no_grad():
            if strategy == "bmm" and self.w2t is None:  # (an AdaLNGroup member too: another plan may run it alone)
                self.w2t = torch.stack(self.weights).transpose(1, 2)
                self.b2 = None if self.biases[0] is None else torch.stack(self.biases).unsqueeze(1)  # (2, 1, out)
            elif strategy == "onednn" and self.packed is None:
                self.packed = tuple(torch.ops.mkldnn._reorder_linear_weight(w.detach()) for w in self.weights)
                self.handles = tuple(next(_HANDLES) for _ in self.packed)  # for the compiled form (traced)
                _PACKED.update(zip(self.handles, self.packed))
                weakref.finalize(self, _drop_packed, self.handles)

    def sliced(self, n_out: int) -> "PairLinear":
        """A shallow copy holding no copies, cut to its first n_out outputs (views of the weights):
        what the GEMM measurement times (dgfast.gemm_choice), so that its candidates' copies are
        its own and a large layer can be timed on part of its columns."""
        s = copy.copy(self)
        s.w2t = s.b2 = s.packed = s.handles = s.group = None
        if self.key is not None and n_out < self.out_features:
            s.out_features = n_out
            s.weights = tuple(w[:n_out] for w in self.weights)
            s.biases = tuple(None if b is None else b[:n_out] for b in self.biases)
            s.loras = [(At, Bt[:, :n_out], None if b is None else b[:n_out], sc) for At, Bt, b, sc in self.loras]
        return s

    def release(self, strategy: str):
        """Drop the copy of `strategy` (a measured candidate that was not chosen)."""
        if strategy == "bmm":
            self.w2t = self.b2 = None
        elif strategy == "onednn":
            _drop_packed(self.handles or ())
            self.packed = self.handles = None

    def gives_halves(self, strategy: str) -> bool:
        """Whether a call with halves=True returns the two halves (per-half GEMMs) instead of one tensor."""
        return self.kind == "separate" or (not self.shared and strategy == "onednn")

    def may_read_halves(self) -> bool:
        """Whether some strategy of the layer feeding this one gives per-half outputs."""
        return self.fed_by is not None and any(self.fed_by.gives_halves(s) for s in self.fed_by.strategies())

    def extra_bytes(self) -> int:
        """Bytes of the copies this layer holds (its share of an adaLN group's copy)."""
        if self.group is not None:
            return 2 * _nbytes(self.weights[0], self.biases[0])
        return _nbytes(self.w2t, self.b2) + (_nbytes(*self.weights) if self.packed is not None else 0)

    # -- the paired call -----------------------------------------------------------------------

    def __call__(self, x, shape=None, *, strategy: str = "mm", gelu: bool = False, halves: bool = False,
                 backend: str = "auto", workspace=None):
        """x: the 2M input rows -- one tensor (any leading shape, rows in order) or a (fine-tuned,
        pre-trained) pair of halves. gelu: apply tanh-GELU to the output (in oneDNN's epilogue when
        the strategy allows). Returns the output viewed as (*shape, out) (shape None: as the GEMM
        left it), or the pair of halves when halves=True and the GEMMs made halves. Reshapes that
        are already in place are skipped: every view is a dispatched op. workspace(shape) -> a
        reusable output buffer (the caller guarantees its previous contents are dead)."""
        if self.gives_halves(strategy):
            ya, yb = self._per_half(x, gelu, backend)
            if halves:
                return ya, yb
            out = torch.cat([ya, yb]) if workspace is None else \
                torch.cat([ya, yb], out=workspace((ya.shape[0] * 2, *ya.shape[1:])))
        else:
            fuse = gelu and strategy == "onednn" and not self.loras  # not after a LoRA delta
            late_bias = self._bias_in_gelu(gelu)
            if self.shared:
                out = self._shared(x, strategy == "onednn", fuse)
            elif strategy == "bmm":
                out = self._bmm(x, workspace, bias=not late_bias)
            else:
                out = self._mm(x, workspace, bias=not late_bias)
            if gelu and not fuse:  # in place: out is this call's own GEMM output
                self._gelu_(out, late_bias, backend)
        if shape is not None and tuple(out.shape[:-1]) != tuple(shape):
            out = out.view(*shape, -1)
        return out

    def _bias_in_gelu(self, gelu: bool) -> bool:
        """Whether stacked GEMMs before a GELU leave the bias to the GELU pass, per half (ATen's addmm
        and baddbmm first copy the broadcast bias into the output: a pass over it saved)."""
        return gelu and not self.shared and not self.loras and self.biases[0] is not None

    def _gelu_(self, out, late_bias: bool, backend) -> None:
        """GELU in place on this layer's own GEMM output; with late_bias, each (M, out) half of the
        (2, M, out) output with its model's bias."""
        if late_bias:
            for half, b in zip(out.unbind(0), self.biases):
                ops.gelu_tanh_(half, b, backend=backend)
        else:
            ops.gelu_tanh_(out, backend=backend)

    def _per_half(self, x, gelu, backend):
        """Each half on its own: the models' modules ("separate") or oneDNN on the prepacked copies."""
        xa, xb = _halves(x)
        fuse = False
        if self.kind == "separate":
            ya, yb = self.ft_mod(xa), self.pre_mod(xb)
        else:
            fuse = gelu and not self.loras
            ya = _onednn_linear(xa, self.packed[0], self.biases[0], fuse)
            yb = _onednn_linear(xb, self.packed[1], self.biases[1], fuse)
            if self.loras:
                self._add_lora(xa, ya)
        if gelu and not fuse:
            ya, yb = ops.gelu_tanh(ya, backend=backend), ops.gelu_tanh(yb, backend=backend)
        return ya, yb

    def _shared(self, x, onednn: bool, fuse: bool):
        """One GEMM over all 2M rows (+ the LoRA delta on the fine-tuned rows)."""
        x, n_in = _whole(x), self.in_features
        if x.shape[-1] != n_in:
            x = x.reshape(2, -1, n_in)
        w, b = self.weights[0], self.biases[0]
        out = _onednn_linear(x, w, b, fuse) if onednn else F.linear(x, w, b)
        if self.loras:
            self._add_lora(x.view(2, -1, n_in).unbind(0)[0], out.view(2, -1, self.out_features).unbind(0)[0])
        return out

    def _rows2(self, x):
        """x as (2, M, in): [fine-tuned rows; pre-trained rows] (a view when the layout allows)."""
        x, n_in = _whole(x), self.in_features
        return x if x.dim() == 3 and x.shape[0] == 2 and x.shape[2] == n_in else x.reshape(2, -1, n_in)

    def _bmm(self, x, workspace, bias: bool = True):
        x2 = self._rows2(x)
        buf = None if workspace is None else workspace((2, x2.shape[1], self.out_features))
        out = torch.baddbmm(self.b2, x2, self.w2t, out=buf) if bias and self.b2 is not None else \
            torch.bmm(x2, self.w2t, out=buf)
        if self.loras:
            self._add_lora(x2[0], out[0])
        return out

    def _mm(self, x, workspace, bias: bool = True):
        """Two GEMMs straight into the halves of one buffer: no concatenation afterwards (halves given
        as a pair are read as they are). bias=False: the caller adds the biases."""
        parts = [xi.reshape(-1, self.in_features) for xi in x] if isinstance(x, tuple) else self._rows2(x).unbind(0)
        shape = (2, parts[0].shape[0], self.out_features)
        out = parts[0].new_empty(shape) if workspace is None else workspace(shape)
        for xi, oi, w, b in zip(parts, out.unbind(0), self.weights, self.biases):
            if b is not None and bias:
                torch.addmm(b, xi, w.t(), out=oi)
            else:
                torch.mm(xi, w.t(), out=oi)
        if self.loras:
            self._add_lora(parts[0], out[0])
        return out

    def _add_lora(self, x_ft, out_ft):
        """peft's result + B(A(x)) * s, on the fine-tuned rows only, in place."""
        x_ft = x_ft.reshape(-1, self.in_features)
        o = out_ft.view(-1, self.out_features)
        for At, Bt, b_B, s in self.loras:
            o.addmm_(torch.mm(x_ft, At), Bt, alpha=s)
            if b_B is not None:
                o.add_(b_B, alpha=s)

    # -- one side alone; the traceable form ----------------------------------------------------

    def half(self, x, side: int, shape=None, *, gelu: bool = False, backend: str = "auto"):
        """One model's layer on its own rows x (side 0: fine-tuned, 1: pre-trained), as a dgfast DiT
        runs it: F.linear on the model's weights (+ its LoRA delta), or its module."""
        if self.kind == "separate":
            y = (self.ft_mod, self.pre_mod)[side](x if x.dim() <= 3 else x.flatten(2))
            if gelu:  # a module's output: not ours to overwrite
                y = ops.gelu_tanh(y, backend=backend)
        else:
            x = x.reshape(-1, self.in_features)
            y = F.linear(x, self.weights[side], self.biases[side])
            if side == 0 and self.loras:
                self._add_lora(x, y)
            if gelu:  # in place: y is this call's own GEMM output
                y = ops.gelu_tanh_(y, backend=backend)
        return y if shape is None else y.view(*shape, -1)

    def traced(self, x, shape=None, *, strategy: str = "mm", gelu: bool = False, halves: bool = False,
               backend: str = "auto"):
        """The paired call for torch.compile: no out=, no workspace, no copies; GELU in place only on
        the GEMM's own fresh output (inductor re-inplaces the op, as eager writes it).
        The strategy the pair measured and chose stays: "onednn" as one dgfast::packed_linear call
        per half on the prepacked weights (GELU fused; the halves returned as such when halves=True),
        "bmm" as one baddbmm over the stacked copy; every other layer is F.linear per half and inductor
        picks the GEMM. Returns (2M, out) viewed as (*shape, out), or the pair of halves."""
        if strategy == "bmm" and self.w2t is not None and self.kind == "stacked":
            x2 = torch.stack([xi.reshape(-1, self.in_features) for xi in x]) if isinstance(x, tuple) else \
                x.reshape(2, -1, self.in_features)
            late_bias = self._bias_in_gelu(gelu)  # as eager; in place: inductor re-inplaces the op
            out = torch.baddbmm(self.b2, x2, self.w2t) if self.b2 is not None and not late_bias else \
                torch.bmm(x2, self.w2t)
            if gelu:
                self._gelu_(out, late_bias, backend)
            return out if shape is None else out.view(*shape, -1)
        xa, xb = _halves(x)
        if strategy == "onednn" and self.handles is not None and self.kind == "stacked":
            fuse = gelu and not self.loras
            ya, yb = (packed_linear(xi.reshape(-1, self.in_features), b, h, self.out_features, fuse)
                      for xi, b, h in zip((xa, xb), self.biases, self.handles))
            if gelu and not fuse:
                ya, yb = ops.gelu_tanh(ya, backend=backend), ops.gelu_tanh(yb, backend=backend)
            if halves:
                return ya, yb
            out = torch.cat([ya, yb])
            return out if shape is None else out.view(*shape, -1)
        if self.kind == "separate":
            out = torch.cat([self.ft_mod(xa).flatten(0, -2), self.pre_mod(xb).flatten(0, -2)])
        else:
            xa, xb = xa.reshape(-1, self.in_features), xb.reshape(-1, self.in_features)
            ya, yb = F.linear(xa, self.weights[0], self.biases[0]), F.linear(xb, self.weights[1], self.biases[1])
            for At, Bt, b_B, s in self.loras:
                ya = ya + torch.mm(torch.mm(xa, At), Bt) * s + (0 if b_B is None else b_B * s)
            out = torch.cat([ya, yb])
        if gelu:
            out = ops.gelu_tanh_(out, backend=backend)
        return out if shape is None else out.view(*shape, -1)

    def tensors(self):
        """The tensors this object holds (for memory accounting)."""
        if self.kind == "separate":
            return list(self.ft_mod.parameters()) + list(self.pre_mod.parameters())
        held = [t for lo in self.loras for t in lo[:3] if t is not None]
        mine = (*self.weights[:1 if self.shared else 2], *self.biases[:1 if self.shared else 2], self.w2t, self.b2)
        return held + [t for t in mine if t is not None]


class AdaLNGroup:
    """Every stacked adaLN Linear (all blocks + final layer) as one baddbmm: they all read the
    same SiLU(c), so their stacked weights are concatenated along `out` once (the copy stacking
    makes anyway), and one launch yields all blocks' shift/scale/gate rows. This is the "bmm"
    strategy of the adaLN layers (dgfast.gemm_choice times it per layer: the same bytes and FLOPs)."""

    def __init__(self, layers: list[tuple[int, PairLinear]]):
        self.index = [i for i, _ in layers]
        self.sizes = [pl.out_features for _, pl in layers]
        pls = [pl for _, pl in layers]
        with torch.inference_mode(False), torch.no_grad():
            w = torch.stack([torch.cat([pl.weights[i] for pl in pls]) for i in (0, 1)])
            self.w2t = w.transpose(1, 2)                                      # (2, D, sum out)
            self.b2 = torch.stack([torch.cat([pl.biases[i] for pl in pls]) for i in (0, 1)]).unsqueeze(1)
        self.members = pls
        for pl in pls:  # the group computes these layers; each row reports its share of the copy
            pl.group = self

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

