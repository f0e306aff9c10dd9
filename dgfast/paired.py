"""Paired execution: the fine-tuned and the pre-trained DiT as one model over one batch.

Every DoG step evaluates two transformers on the same x_t and t. `pair(ft, pre)` runs both
over the concatenated batch [x; x] (2n rows, fine-tuned rows first) and decides, layer by
layer and once, how each layer runs (dgfast.pair_layers):

  shared             identical weights (same storage, or equal values): one GEMM over 2n rows.
  stacked            different weights: a GEMM strategy per layer shape -- one baddbmm over
                     stacked copies, two oneDNN GEMMs with bias/GELU fused on prepacked copies,
                     or two addmm into one buffer -- the fastest one measured on this machine at
                     the first forward of each batch size (dgfast.gemm_choice); `gemm=` forces one.
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
A pair whose measured GEMMs are slower than two separate passes runs two passes (each model's
layers on its own n rows, as two dgfast DiT forwards do); report() says so.

Memory: shared and LoRA layers use the models' own tensors (one copy of a shared base). A
stacked layer costs a copy of both weights when its strategy is "bmm" (stacked; all blocks'
adaLN concatenated into one) or "onednn" (prepacked) -- for a full fine-tune as much again as
both models; "mm" allocates nothing. `report()` lists the bytes per layer and the strategies.
A pair reuses its sub-layer output buffers call after call: one forward_pair at a time per pair.
`dgfast.pair_cache.get_pair(ft, pre)` caches one pair per model pair and rebuilds it when a
weight changed; `dgfast.cuda_graph` replays a whole step (paired forward + update) as a CUDA graph.
"""
from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from dgfast import gemm_choice, ops
from dgfast.gemm_choice import TWO_PASS, Entry, Plan, onednn_available
from dgfast.models import DiT, blocks_forward, unpatchify
from dgfast.pair_layers import (GEMMS, AdaLNGroup, PairLinear, _hooked, _is_lora, _nbytes, _param_bytes,  # noqa: F401
                                _parts, _same)

KINDS = ("shared", "stacked", "lora", "stacked+lora", "shared-activation", "separate")
_ARCH_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
              "learn_sigma", "norm_eps", "mlp_norm_eps")


# ----------------------------------------------------------------------------------------------
# The paired model
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerRow:
    name: str
    kind: str
    bytes_two_models: int  # weight bytes of this layer in the two models, counted separately
    bytes_used: int        # weight bytes the paired forward reads (a shared weight counted once)
    bytes_extra: int       # bytes the pair itself allocated (stacked or prepacked copies)
    note: str = ""


_BLOCK_LINEARS = (("ada", "adaLN_modulation.1"), ("qkv", "attn.qkv"), ("proj", "attn.proj"), ("fc1", "mlp.fc1"),
                  ("fc2", "mlp.fc2"))
_WORKSPACE_ROLES = ("qkv", "proj", "fc1", "fc2")  # outputs that are dead once the next op has read them
_ADALN_ROLES = ("ada", "final_ada")         # n rows (one per sample), not n * tokens
_STRATEGY_NOTE = {"bmm": "one baddbmm over a stacked (2,out,in) copy",
                  "onednn": "two oneDNN GEMMs (bias, GELU fused) on prepacked copies",
                  "mm": "two GEMMs into one output, no weight copy"}
_GEMM_NOTE = {"bmm": "stacked copies for baddbmm, adaLN concatenated",
              "onednn": "MLP and output layer as per-half oneDNN GEMMs on prepacked copies, attention and "
                        "adaLN as stacked baddbmm",
              "mm": "no copies: stacked layers run as two GEMMs",
              "auto": "the fastest strategy per layer shape, measured at the first forward of each batch size"}


def forced_strategy(gemm: str, key: tuple) -> str:
    """The strategy gemm= forces on a layer shape. "onednn" is the CPU layout of earlier versions:
    the MLP and output layer as per-half oneDNN GEMMs; attention (SDPA wants one qkv tensor, which
    per-half GEMMs would have to concatenate) and adaLN (one group) as stacked baddbmm."""
    role, kind = key[:2]
    if gemm != "onednn" or role in ("fc1", "fc2", "final"):
        return gemm
    if kind == "stacked":
        return "bmm"
    return "onednn" if role in ("qkv", "proj") else "mm"


def _sdpa(qkv: torch.Tensor, impl: str) -> torch.Tensor:
    """Attention over a (N, T, 3, H, hd) qkv: one call for all N rows; returns (N, T, H, hd)."""
    if impl == "xformers" and qkv.is_cuda:
        import xformers.ops as xops
        q, k, v = qkv.unbind(2)                   # (N, T, H, hd): xformers' layout, strided views
        return xops.memory_efficient_attention(q, k, v)
    # q, k, v as strided (N, H, T, hd) views of qkv: no permute copy; the output is (N, T, H, hd)
    # after the transpose, which the proj GEMMs read as (2, nT, D) (a view).
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


class PairedDiT:
    """Both models as one: `forward_pair(x, t, y, null_label, backend=None) -> (out_ft, out_pre)`.

    Build with `dgfast.pair(finetuned, pretrained)` or the cached `dgfast.pair_cache.get_pair`.
    Holds the two models' submodules and tensors, never the top-level modules themselves (so the
    cache in get_pair does not keep the models alive).
    """

    def __init__(self, finetuned: DiT, pretrained: DiT, *, gemm: str = "auto"):
        ft, pre = finetuned, pretrained
        _check_pairable(ft, pre)
        self.gemm = _check_gemm(gemm, next(ft.parameters()))
        self._init_state(ft)
        self._embed_rows = [self._pair_patch_embedding(ft, pre), self._pair_pos_embed(ft, pre),
                            *self._pair_timestep_embedding(ft, pre), self._pair_label_tables(ft, pre)]
        self._pair_linears(ft, pre)
        covered = {id(t) for t in self._row_params(ft, pre)}  # what the rows do not cover: wrappers' parameters
        self.uncovered = [n for m in (ft, pre) for n, p in m.named_parameters() if id(p) not in covered]
        self._forced = None
        if self.gemm != "auto":
            self._forced = self._use_plan(Plan({pl.key: forced_strategy(self.gemm, pl.key)
                                                for pl in self.linears() if pl.key is not None}, forced=self.gemm))

    # -- construction steps -----------------------------------------------------------------------

    def _init_state(self, ft: DiT):
        self._ft_ref = weakref.ref(ft)  # settings (backend, attention impl) are read per call
        self._graphs: dict = {}     # captured CUDA graphs per shape (dgfast.cuda_graph.run_cuda_graph)
        self._null_rows: dict = {}  # the pre-trained model's null-label embedding, per (label, device)
        self._buffers: dict = {}    # reused sub-layer outputs, per (role, shape) (forward_pair)
        self._plans: dict = {}      # gemm="auto": the measured Plan per batch size n
        self._groups: dict = {}     # AdaLNGroup per member set (a plan's "bmm" adaLN layers)
        self._last_plan = None
        self.num_heads, self.patch_size, self.out_channels = ft.num_heads, ft.patch_size, ft.out_channels
        self.num_tokens = (ft.input_size // ft.patch_size) ** 2
        self.norm_eps, self.mlp_norm_eps = ft.norm_eps, ft.mlp_norm_eps
        self.backend, self.attn_impl = ft.backend, ft.blocks[0].attn.impl if len(ft.blocks) else "sdpa"

    def _pair_patch_embedding(self, ft, pre) -> LayerRow:
        """x_t is the same for both halves: one conv on n rows when the weights match."""
        fe, pe = _parts(ft.x_embedder.proj, nn.Conv2d), _parts(pre.x_embedder.proj, nn.Conv2d)
        two = _param_bytes(ft.x_embedder) + _param_bytes(pre.x_embedder)
        self.x_embedders = (ft.x_embedder, pre.x_embedder)
        if fe is not None and pe is not None and not pe.loras and _same(fe.weight, pe.weight) \
                and _same(fe.bias, pe.bias) and _same_conv(fe.base, pe.base):
            self.x_kind = "lora" if fe.loras else "shared-activation"
            self.x_conv, self.x_loras = fe.base, fe.loras
            used = _nbytes(fe.weight, fe.bias) + sum(_param_bytes(A) + _param_bytes(B) for A, B, _ in fe.loras)
            return LayerRow("x_embedder.proj", self.x_kind, two, used, 0,
                            "conv once on n rows" + (" + delta on fine-tuned rows" if fe.loras else ""))
        if _hooked(ft.x_embedder) or _hooked(pre.x_embedder):
            raise ValueError("pair: hooks on x_embedder itself are not supported (hook x_embedder.proj)")
        self.x_kind = "separate"
        return LayerRow("x_embedder.proj", "separate", two, two, 0, "each model's conv on n rows")

    def _pair_pos_embed(self, ft, pre) -> LayerRow:
        self.pos = (ft.pos_embed, pre.pos_embed)
        self.pos_shared = _same(ft.pos_embed, pre.pos_embed)
        two = _nbytes(*self.pos)
        if self.pos_shared:
            return LayerRow("pos_embed", "shared-activation", two, two // 2, 0, "added once on n rows")
        return LayerRow("pos_embed", "separate", two, two, 0, "each model's table")

    def _pair_timestep_embedding(self, ft, pre) -> list[LayerRow]:
        """t is the same for both halves: the sinusoid depends on t and the frequency table only
        (shared whenever those match), the MLP on its weights."""
        fte, pte = ft.t_embedder, pre.t_embedder
        self.t_embedders = (fte, pte)
        self.t_freq_shared = (fte.freq_divisor == pte.freq_divisor
                              and fte.frequency_embedding_size == pte.frequency_embedding_size
                              and not _hooked(fte) and not _hooked(pte))
        t_parts = [(_parts(fte.mlp[i], nn.Linear), _parts(pte.mlp[i], nn.Linear)) for i in (0, 2)]
        self.t_shared = (self.t_freq_shared and not _hooked(fte.mlp) and not _hooked(pte.mlp)
                         and all(a is not None and b is not None and not a.loras and not b.loras
                                 and _same(a.weight, b.weight) and _same(a.bias, b.bias) for a, b in t_parts))
        rows = []
        for i in (0, 2):
            two = _param_bytes(fte.mlp[i]) + _param_bytes(pte.mlp[i])
            note = "once on n rows" if self.t_shared else \
                "each model's MLP" + (" (sinusoid once)" if self.t_freq_shared else "")
            rows.append(LayerRow(f"t_embedder.mlp.{i}", "shared-activation" if self.t_shared else "separate",
                                 two, two // 2 if self.t_shared else two, 0, note))
        return rows

    def _pair_label_tables(self, ft, pre) -> LayerRow:
        """Labels y vs the null label always differ: each model's own table."""
        self.y_embedders = (ft.y_embedder, pre.y_embedder)
        two = _param_bytes(ft.y_embedder) + _param_bytes(pre.y_embedder)
        return LayerRow("y_embedder.embedding_table", "separate", two, two, 0, "labels y vs null: each model's table")

    def _pair_linears(self, ft, pre):
        """Every block's Linears and the final layer's, as PairLinears (upstream names and roles)."""
        def lin(name, role):
            return PairLinear(name, role, ft.get_submodule(name), pre.get_submodule(name))

        self.blocks = [{role: lin(f"blocks.{i}.{path}", role) for role, path in _BLOCK_LINEARS}
                       for i in range(len(ft.blocks))]
        for blk in self.blocks:
            blk["fc2"].fed_by = blk["fc1"]  # fc2's input form (halves or one tensor) follows fc1's strategy
        self.final_ada = lin("final_layer.adaLN_modulation.1", "final_ada")
        self.final_linear = lin("final_layer.linear", "final")

    @staticmethod
    def _row_params(ft, pre):
        for m in (ft, pre):
            yield from m.x_embedder.parameters()
            yield m.pos_embed
            yield from m.t_embedder.parameters()
            yield from m.y_embedder.parameters()
            yield from m.blocks.parameters()
            yield from m.final_layer.parameters()

    def linears(self) -> list[PairLinear]:
        """Every PairLinear in forward order."""
        return [pl for blk in self.blocks for pl in blk.values()] + [self.final_ada, self.final_linear]

    # -- settings ---------------------------------------------------------------------------------

    def _settings(self, backend=None):
        """(backend, attention impl) for this call: the fine-tuned model's current settings
        (set_backend / set_attention made after pairing), `backend` overriding its backend."""
        ft = self._ft_ref()
        if ft is not None:
            self.backend = ft.backend
            if len(ft.blocks):
                self.attn_impl = ft.blocks[0].attn.impl
        if backend is None:
            return self.backend, self.attn_impl
        if backend not in ops.BACKENDS:
            raise ValueError(f"forward_pair: backend must be None or one of {ops.BACKENDS}, got {backend!r}")
        return backend, self.attn_impl

    # -- forward ----------------------------------------------------------------------------------

    def __call__(self, x, t, y, null_label=1000, backend=None):
        return self.forward_pair(x, t, y, null_label, backend)

    def forward_pair(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null_label=1000, backend=None):
        """(out_ft, out_pre): finetuned(x, t, y) and pretrained(x, t, null_label), one 2n batch.

        x (n, C, H, W), t (n,), y (n,) int64; null_label an int or an (n,) tensor. backend: the
        fused ops' implementation for this call (dgfast.ops.BACKENDS; None: the models' setting).
        Outputs are inference tensors (computed under torch.inference_mode). The first call with
        a new n measures the GEMM strategies (gemm="auto"; dgfast.gemm_choice); a pair whose
        GEMMs measured slower than two separate passes runs two passes (report() says which).
        Under torch.compile the forward traces a functional form (no workspace buffers, copies
        or caches: inductor plans memory and GEMMs itself).
        """
        if torch.compiler.is_compiling():
            return self._forward_traced(x, t, y, null_label, backend)
        with torch.inference_mode():
            backend, impl = self._settings(backend)
            plan = self._plan_for(x, backend)
            n = x.shape[0]
            h, c = self._embed_tokens(x), self._embed_cond(t, y, null_label, n)
            if plan.two_pass:  # each model on its own n rows; the embeddings of equal inputs stay shared
                return tuple(self._run(h[k * n:(k + 1) * n], c[k * n:(k + 1) * n], _half_call(k, backend), backend,
                                       impl) for k in (0, 1))
            out = self._run(h, c, self._paired_call(plan, backend, h), backend, impl, plan.group)
        return out[:n], out[n:]

    def prepare_plan(self, x: torch.Tensor, backend=None) -> None:
        """Measure (gemm="auto") the GEMM strategies for x's batch size now, eagerly, and make their
        copies: a compiled forward_pair cannot measure while it is traced, and reads the plan."""
        if not torch.compiler.is_compiling():
            with torch.inference_mode():
                self._plan_for(x, self._settings(backend)[0])

    def _forward_traced(self, x, t, y, null_label, backend):
        with torch.no_grad():
            backend, impl = self._settings(backend)
            n = x.shape[0]
            h, c = self._embed_tokens(x), self._embed_cond(t, y, null_label, n, cache=False)
            plan = self._forced or self._plans.get(n)  # measured by prepare_plan before the first compiled call
            strategies = plan.strategies if plan is not None and not plan.two_pass else {}
            out = self._run(h, c, _traced_call(backend, strategies), backend, impl)
        return out[:n], out[n:]

    def _paired_call(self, plan, backend, like):
        strategies = plan.strategies

        def call(pl, z, shape=None, *, gelu=False, halves=False, role=None):
            # Sub-layer outputs go to buffers reused block after block: each is dead once the next
            # op has read it (SDPA reads qkv, fc2 reads fc1 (GELU'd in place), the residual op reads
            # proj / fc2). A fresh multi-MB tensor per call costs page faults on first touch (see
            # "Fused ops (CPU)" in bench/RESULTS.md).
            out_buffer = None if role is None else (lambda shape: self._workspace(role, shape, like))
            return pl(z, shape, strategy=strategies.get(pl.key, "mm"), gelu=gelu, halves=halves, backend=backend,
                      workspace=out_buffer)
        return call

    def _run(self, h, c, call, backend, impl, group=None):
        """Blocks and final layer on tokens h (N, T, D) and conditioning c (N, D); every Linear
        through call(pair_linear, input, shape, gelu=, halves=, role=). Returns (N, C, H, W)."""
        N, T, D = h.shape
        H, blocks = self.num_heads, self.blocks
        mods, final = self._modulation(F.silu(c), D, call, group)  # SiLU(c) is read by every adaLN GEMM

        def attn(i, xm):
            qkv = call(blocks[i]["qkv"], xm, (N, T, 3, H), role="qkv")  # (N, T, 3, H, hd): one SDPA
            return call(blocks[i]["proj"], _sdpa(qkv, impl), (N, T), role="proj")

        def mlp(i, xm):
            # fc1's output (GELU applied, fused into oneDNN's epilogue where it runs) goes to fc2 as
            # the GEMMs left it: per-half outputs stay halves, no concatenation in between.
            z = call(blocks[i]["fc1"], xm, gelu=True, halves=True, role="fc1")
            return call(blocks[i]["fc2"], z, (N, T), role="fc2")

        xm = blocks_forward(h, mods, final, attn, mlp, eps=self.norm_eps, mlp_eps=self.mlp_norm_eps,
                            backend=backend)
        return unpatchify(call(self.final_linear, xm, (N, T)), self.patch_size, self.out_channels)

    def _workspace(self, role, shape, like):
        key = (role, tuple(shape), like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _modulation(self, silu_c, D, call, group):
        """Every block's six (N, D) adaLN chunks and the final layer's two."""
        grouped = group(silu_c, D) if group is not None else {}
        N = silu_c.shape[0]
        mods = [grouped[i] if i in grouped else call(blk["ada"], silu_c, (N,)).chunk(6, dim=1)
                for i, blk in enumerate(self.blocks)]
        final = grouped.get(len(self.blocks)) or call(self.final_ada, silu_c, (N,)).chunk(2, dim=1)
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

    def _embed_cond(self, t, y, null_label, n, cache: bool = True):
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
        elif not cache:
            y_pre = self.y_embedders[1](torch.full((1,), int(null_label), dtype=torch.long, device=y.device), False)
        else:  # one table row, broadcast over the n rows; looked up once per label and device
            key = (int(null_label), y.device)
            if key not in self._null_rows:
                with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable outside inference mode
                    self._null_rows[key] = self.y_embedders[1](
                        torch.full((1,), key[0], dtype=torch.long, device=y.device), False)
            y_pre = self._null_rows[key]
        return torch.cat([t_ft + y_ft, t_pre + y_pre])    # upstream's c = t_emb + y_emb

    # -- GEMM strategy ----------------------------------------------------------------------------

    def _plan_for(self, x, backend) -> Plan:
        """The strategies for this batch size: forced by gemm=, or measured at its first forward."""
        if self._forced is not None:
            return self._forced
        n = x.shape[0]
        plan = self._plans.get(n)
        if plan is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("forward_pair: run one forward of this batch size before capturing a CUDA "
                                   "graph (the GEMM strategy is measured at the first forward)")
            like = next(iter(self.pos))
            plan = self._plans[n] = self._use_plan(self._measure(n, backend, like))
        self._last_plan = plan
        return plan

    def _by_key(self) -> dict:
        """{layer shape key: its PairLinears}, in forward order ("separate" layers have no choice)."""
        groups: dict = {}
        for pl in self.linears():
            if pl.key is not None:
                groups.setdefault(pl.key, []).append(pl)
        return groups

    def measurement_entries(self, n: int) -> list[Entry]:
        """What the measurement at batch size n times: one Entry per layer shape, cut to the
        budget (gemm_choice.measured_size). Shapes only: no tensor is touched (so DiT-XL/2's bound
        can be checked on meta models)."""
        like = next(iter(self.pos))
        groups = self._by_key()
        full = [Entry(key, len(pls), n if key[0] in _ADALN_ROLES else n * self.num_tokens, key[2], key[3],
                      pls[0].strategies(), sliceable=key[0] not in _ADALN_ROLES)
                for key, pls in groups.items()]
        # a layer that may read per-half input is timed a second time on one tensor (_price_with_feeder)
        twice = [e for e in full if groups[e.key][0].may_read_halves()]
        rows, cols = gemm_choice.measured_size(full + twice, like.device.type, like.element_size())
        return [e.cut(rows, cols) for e in full]

    def _measure(self, n, backend, like) -> Plan:
        t0 = time.perf_counter()
        reps = {key: pls[0] for key, pls in self._by_key().items()}  # one layer per shape is timed
        picks, chosen = [], {}
        for e in self.measurement_entries(n):
            pl = reps[e.key]
            form = self._input_form(pl, chosen)
            p = self._pick(pl, e, form, backend, like)
            if form == "halves" and pl.may_read_halves():
                p = self._price_with_feeder(pl, e, p, picks, chosen, backend, like)
            picks.append(p)
            chosen[pl.key] = p.choice
        return Plan(chosen, two_pass=gemm_choice.decide(picks), picks=picks, seconds=time.perf_counter() - t0)

    def _pick(self, pl: PairLinear, e: Entry, form: str, backend, like) -> gemm_choice.Pick:
        """The timings of entry e's candidates with the input in `form` (measured, or cached)."""
        gelu = ops.resolve_backend(backend, like) if pl.role == "fc1" else ""  # the unfused GELU's cost
        e = replace(e, key=e.key + (form, gelu), candidates=functools.partial(
            self._candidate_runs, pl.sliced(e.out_features), e.rows, form, backend, like))
        with torch.inference_mode():  # as in the forward (out= GEMMs on the weights need it)
            return gemm_choice.pick(e, like.device, like.dtype)

    def _price_with_feeder(self, pl, e, p, picks, chosen, backend, like) -> gemm_choice.Pick:
        """fc1's fastest strategy left per-half outputs, so fc2 reads halves (its "bmm" first stacks
        them: a copy of fc1's whole output). Chosen one layer at a time, fc1 never pays for that
        copy; priced together it can lose to fc1's fastest one-tensor strategy plus fc2 on one
        tensor. The cheaper pair of choices is kept (fc1's pick records the override)."""
        feeder = next(q for q in picks if q.entry.key[:len(pl.fed_by.key)] == pl.fed_by.key)
        whole = {s: t for s, t in feeder.times.items() if not pl.fed_by.gives_halves(s)}
        if not whole:
            return p
        other = min(whole, key=whole.get)
        alt = self._pick(pl, e, "full", backend, like)

        def cost(q, s):
            return q.entry.count * q.entry.scale * q.times[s]
        if cost(feeder, other) + cost(alt, alt.choice) < cost(feeder, feeder.choice) + cost(p, p.choice):
            feeder.chosen = other
            chosen[pl.fed_by.key] = other
            return alt
        return p

    @staticmethod
    def _input_form(pl: PairLinear, chosen: dict) -> str:
        """How the forward hands this layer its input: SDPA's transposed heads (proj), fc1's halves
        (fc2 after per-half GEMMs), else one contiguous tensor."""
        if pl.role == "proj":
            return "heads"
        if pl.role == "fc2" and pl.fed_by is not None and pl.fed_by.gives_halves(chosen.get(pl.fed_by.key, "mm")):
            return "halves"
        return "full"

    def _candidate_runs(self, pl: PairLinear, rows: int, form: str, backend: str, like) -> dict:
        """{strategy: run} for timing pl (a PairLinear.sliced copy: its copies are the measurement's
        own) on `rows` rows per half of random input in the forward's form (a private generator:
        the sampler's random stream is not touched), plus two-pass."""
        g = torch.Generator(device=like.device).manual_seed(0)

        def rand(*shape):
            return torch.randn(shape, generator=g, device=like.device, dtype=like.dtype)

        n_in, H = pl.in_features, self.num_heads
        x = rand(2, H, rows, n_in // H).transpose(1, 2) if form == "heads" else \
            (rand(rows, n_in), rand(rows, n_in)) if form == "halves" else rand(2, rows, n_in)
        bufs: dict = {}

        def workspace(shape):
            if tuple(shape) not in bufs:
                bufs[tuple(shape)] = torch.empty(shape, device=like.device, dtype=like.dtype)
            return bufs[tuple(shape)]

        gelu, out_buffer = pl.role == "fc1", workspace if pl.role in _WORKSPACE_ROLES else None
        runs = {}
        for s in pl.strategies():
            pl.prepare(s)
            runs[s] = functools.partial(pl, x, strategy=s, gelu=gelu, halves=gelu, backend=backend,
                                        workspace=out_buffer)
        sides = x if isinstance(x, tuple) else x.unbind(0)
        runs[TWO_PASS] = lambda: [pl.half(xk, k, gelu=gelu, backend=backend) for k, xk in enumerate(sides)]
        return runs

    def _use_plan(self, plan: Plan) -> Plan:
        """Make the copies the plan's strategies read (and drop the ones no plan reads any more); the
        stacked adaLN layers whose strategy is "bmm" run as one AdaLNGroup."""
        s = plan.strategies
        ada = [blk["ada"] for blk in self.blocks] + [self.final_ada]
        grouped = [(i, pl) for i, pl in enumerate(ada)
                   if pl.kind == "stacked" and pl.biases[0] is not None and s.get(pl.key) == "bmm"]
        if not plan.two_pass and len(grouped) > 1:
            key = tuple(i for i, _ in grouped)
            plan.group = self._groups.get(key) or self._groups.setdefault(key, AdaLNGroup(grouped))
        for pl in self.linears():
            if pl.key is not None and not plan.two_pass and not (plan.group and pl in plan.group.members):
                pl.prepare(s[pl.key])
        self._drop_unused_copies(plan)
        return plan

    def _drop_unused_copies(self, new: Plan):
        plans = [p for p in (self._forced, *self._plans.values(), new) if p is not None and not p.two_pass]
        for pl in self.linears():
            if pl.key is None:
                continue
            needed = {p.strategies[pl.key] for p in plans if not (p.group and pl in p.group.members)}
            for s in ("bmm", "onednn"):
                if s not in needed:
                    pl.release(s)

    def choices(self) -> dict:
        """{batch size n: {"strategies": {"role/kind in->out": strategy}, "two_pass": bool, "seconds": s}}
        (gemm forced: one entry under the key "forced")."""
        plans = {"forced": self._forced} if self._forced is not None else self._plans
        return {n: dict(strategies={f"{k[0]}/{k[1]} {k[2]}->{k[3]}": v for k, v in p.strategies.items()},
                        two_pass=p.two_pass, seconds=p.seconds) for n, p in plans.items()}

    # -- report -----------------------------------------------------------------------------------

    @property
    def rows(self) -> list[LayerRow]:
        """One row per layer: kind, weight bytes (two models, used, copied) and how it runs now."""
        return self._embed_rows + [LayerRow(pl.name, pl.kind, pl.bytes_two, pl.bytes_used, pl.extra_bytes(),
                                            self._note(pl)) for pl in self.linears()]

    def _note(self, pl: PairLinear) -> str:
        if pl.kind == "separate":
            return "module calls (a wrapper the pair does not fuse)"
        if pl.shared:
            return "base once over 2n rows + delta on fine-tuned rows" if pl.loras else "one GEMM over 2n rows"
        plan = self._forced or self._last_plan
        if plan is None:
            return "strategy measured at the first forward"
        if plan.two_pass:
            return "two-pass: each model's GEMM on its own rows"
        if plan.group is not None and pl in plan.group.members:
            return "in one baddbmm with all stacked adaLN layers (concatenated stacked copy)"
        return _STRATEGY_NOTE[plan.strategies[pl.key]]

    def kinds(self) -> dict[str, str]:
        """{layer name: kind} for every layer (upstream state_dict names, without .weight/.bias)."""
        return {r.name: r.kind for r in self.rows}

    def memory(self) -> dict[str, int]:
        """Weight bytes: two separate models vs what the paired forward uses and holds."""
        rows = self.rows
        return dict(two_models=sum(r.bytes_two_models for r in rows), used=sum(r.bytes_used for r in rows),
                    extra=sum(r.bytes_extra for r in rows))

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor the pair references (its own copies included)."""
        out = [*self.pos]
        for pl in self.linears():
            out += pl.tensors()
        for m in (*self.x_embedders, *self.t_embedders, *self.y_embedders):
            out += list(m.parameters())
        for group in self._groups.values():
            out += group.tensors()
        return out  # (oneDNN's prepacked weights are opaque tensors: counted in memory()["extra"] only)

    def report(self) -> str:
        """Per layer: kind and weight bytes, two separate models vs the pair; totals; the GEMM
        strategy per layer shape and batch size with its measured times."""
        mib, rows = 1 << 20, self.rows
        width = max(len(r.name) for r in rows)
        lines = [f"{'layer':<{width}}  {'kind':<17} {'2 models MiB':>12} {'pair uses':>10} {'pair copy':>10}  note"]
        for r in rows:
            lines.append(f"{r.name:<{width}}  {r.kind:<17} {r.bytes_two_models / mib:12.3f} "
                         f"{r.bytes_used / mib:10.3f} {r.bytes_extra / mib:10.3f}  {r.note}")
        mem = self.memory()
        counts = {k: sum(r.kind == k for r in rows) for k in KINDS}
        lines.append("")
        lines.append("layers: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        lines.append(f"weights of two separate models: {mem['two_models'] / mib:.2f} MiB; the paired forward reads "
                     f"{mem['used'] / mib:.2f} MiB and allocated {mem['extra'] / mib:.2f} MiB of its own "
                     f"(gemm={self.gemm!r}: {_GEMM_NOTE[self.gemm]})")
        if self.uncovered:
            lines.append(f"parameters outside these layers (used by the models' own modules): {self.uncovered}")
        for n, plan in sorted(self._plans.items()):
            lines += _plan_lines(n, plan)
        if self.gemm == "auto" and not self._plans:
            lines.append("GEMM strategy: not measured yet (at the first forward of each batch size)")
        return "\n".join(lines)


def _plan_lines(n: int, plan: Plan) -> list[str]:
    """A measured plan: per layer shape its choice and times, the totals and the verdict."""
    sources = sorted({p.source for p in plan.picks})
    lines = [f"GEMM strategy for batch {n}: measured in {plan.seconds:.3f} s (timings from {', '.join(sources)}; "
             f"ms per call of both halves, on the rows (and output columns) shown)"]
    for p in plan.picks:
        role, kind, n_in, n_out = p.entry.key[:4]
        times = ", ".join(f"{s} {1e3 * v:.3f}" for s, v in p.times.items())
        cols = "" if p.entry.out_features == n_out else f" cols {p.entry.out_features}"
        lines.append(f"  {role:<9} {kind:<7} {n_in}->{n_out} x{p.entry.count} rows {p.entry.rows}{cols}: "
                     f"{p.choice:<6} [{times}; two-pass {1e3 * p.two_pass:.3f}]"
                     f"{' (priced with the next layer)' if p.chosen else ''}")
    pair, two = plan.totals()
    verdict = ("runs as two separate passes: its GEMMs measured slower than two-pass" if plan.two_pass
               else "runs paired")
    lines.append(f"  GEMMs of one forward (each timing scaled to its layers' full size): pair {1e3 * pair:.3f} ms, "
                 f"two-pass {1e3 * two:.3f} ms -> {verdict}")
    return lines


def _same_conv(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    return (a.stride, a.padding, a.dilation, a.groups, a.padding_mode) == \
        (b.stride, b.padding, b.dilation, b.groups, b.padding_mode)


def _half_call(side: int, backend: str):
    """call(pair_linear, x, ...) of the two-pass path: one model's layer on its own rows."""
    def call(pl, z, shape=None, *, gelu=False, halves=False, role=None):
        return pl.half(z, side, shape, gelu=gelu, backend=backend)
    return call


def _traced_call(backend: str, strategies: dict):
    """call(pair_linear, x, ...) under torch.compile: functional ops only, the measured oneDNN or
    bmm strategy kept where it was chosen (PairLinear.traced)."""
    def call(pl, z, shape=None, *, gelu=False, halves=False, role=None):
        return pl.traced(z, shape, strategy=strategies.get(pl.key, "mm"), gelu=gelu, halves=halves, backend=backend)
    return call


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def _check_pairable(ft, pre):
    for name, m in (("finetuned", ft), ("pretrained", pre)):
        if not isinstance(m, DiT):
            raise TypeError(f"pair: {name} must be a dgfast DiT, got {type(m).__name__}; convert upstream "
                            f"DiT modules, state_dicts and diffusers DiTTransformer2DModel with dgfast.to_dgfast")
    why = pair_mismatch(ft, pre)
    if why:
        raise ValueError(f"pair: the two models cannot run as one batch: {why}")


def _check_gemm(gemm, weight: torch.Tensor) -> str:
    if gemm not in ("auto",) + GEMMS:
        raise ValueError(f"pair: gemm must be 'auto' or one of {GEMMS}, got {gemm!r}")
    if gemm == "onednn" and not onednn_available(weight):
        raise ValueError("pair: gemm='onednn' needs float32 CPU weights and torch built with oneDNN")
    return gemm


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

    gemm: how layers whose weights differ run -- "auto" (the default: each layer shape's fastest
    strategy, timed on this machine at the first forward of each batch size; dgfast.gemm_choice),
    or forced: "bmm" (one baddbmm over stacked copies), "onednn" (the MLP as two oneDNN GEMMs with
    fused bias/GELU; CPU float32), "mm" (two GEMMs, no weight copies at all). See PairLinear.
    """
    return PairedDiT(finetuned, pretrained, gemm=gemm)
