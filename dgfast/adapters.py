"""Model adapters: bring other DiT implementations into dgfast's DiT, and dgfast's DiT into diffusers.

    to_dgfast(model_or_state_dict, share=False, **config) -> dgfast.DiT (same device and dtype;
        weights copied, or with share=True the given tensors themselves where the layout allows)
    to_diffusers(dit) -> diffusers DiTTransformer2DModel (same device and dtype, weights copied)

Supported inputs:
  - a dgfast DiT: returned as is;
  - an upstream-layout DiT module: any nn.Module whose state_dict has facebookresearch/DiT's keys
    (DiT's own models.DiT, dgfast.reference.ReferenceDiT, SiT's backbone, ...);
  - an upstream state_dict, or a train.py checkpoint dict (its "ema" entry, else "model");
  - a diffusers DiTTransformer2DModel, or its state_dict (transformer_blocks.* keys; pass
    input_size=, since diffusers does not store pos_embed).

What cannot be read off the weights comes from the module's attributes, else from `config`,
else from upstream's defaults: num_heads (the DiT zoo's head count for the hidden size),
class_dropout_prob=0.1 (so a K-row label table means num_classes = K - 1). Any DiT(...) keyword
in `config` overrides what was inferred.

A converted diffusers model keeps *diffusers'* numerics, which are not upstream DiT's:
timestep frequencies exp(-ln(1e4) k / 127) instead of / 128 (`freq_divisor=127`) and a pre-MLP
LayerNorm eps of `norm_eps` (1e-5 by default) instead of 1e-6 (`mlp_norm_eps=1e-5`); its
pos_embed is diffusers' recomputed buffer. Pass freq_divisor=None, mlp_norm_eps=1e-6 to get
upstream DiT numerics from the same weights instead (the hub's DiT weights are upstream's).
Conversion does not touch the global RNG (the model is built on the meta device).

share=True uses the source's own tensors instead of copies: the DiT's parameters alias them (an
edit of either is an edit of both). An upstream-layout module shares its layer modules themselves
(Linears, patch Conv2d, label Embedding, with any peft LoRA adapter on them: its LoRA fine-tune then
pairs as one); a state_dict shares every tensor; a diffusers model needs a copy of each block's
q/k/v (concatenated into qkv) and of any bias diffusers leaves out (zeros). `dit.conversion` (a
ConversionReport; print it) says what was shared and what copied.

to_diffusers is the inverse mapping (see its docstring): the diffusers model it gives runs
diffusers' numerics, and to_dgfast of it gives back the same tensors, with those numerics.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dgfast.models import DiT

SUPPORTED = ("a dgfast DiT (returned as is)",
             "an upstream-layout DiT nn.Module (facebookresearch/DiT models.DiT, dgfast.reference.ReferenceDiT, ...)",
             "an upstream DiT state_dict, or a train.py checkpoint dict with 'ema' / 'model'",
             "a diffusers DiTTransformer2DModel",
             "a diffusers DiTTransformer2DModel state_dict (with input_size=...)")

# Upstream's zoo: hidden size -> heads (XL 1152/16, L 1024/16, B 768/12, S 384/6).
_ZOO_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}
_UPSTREAM_MARKERS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight")
_DIFFUSERS_MARKERS = ("pos_embed.proj.weight", "proj_out_1.weight", "proj_out_2.weight")
_DIT_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
             "class_dropout_prob", "num_classes", "learn_sigma", "norm_eps", "mlp_norm_eps", "freq_divisor")


@dataclass
class ConversionReport:
    """What to_dgfast made of its source: the state_dict keys whose tensors the DiT shares with the
    source, and those it holds as copies (key -> bytes), plus notes on numerics."""
    source: str
    shared: dict = field(default_factory=dict)
    copied: dict = field(default_factory=dict)
    note: str = ""

    def __str__(self) -> str:
        mib = 1 << 20
        lines = [f"converted from {self.source}: {len(self.shared)} tensors shared with it "
                 f"({sum(self.shared.values()) / mib:.2f} MiB), {len(self.copied)} copied "
                 f"({sum(self.copied.values()) / mib:.2f} MiB)"]
        if self.copied:
            keys = list(self.copied)
            more = f", ... ({len(keys) - 8} more)" if len(keys) > 8 else ""
            lines.append("  copied: " + ", ".join(keys[:8]) + more)
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


def _unsupported(obj) -> TypeError:
    return TypeError(f"to_dgfast: cannot convert {type(obj).__module__}.{type(obj).__name__}; supported: "
                     + "; ".join(SUPPORTED))


def to_dgfast(model_or_state_dict, *, share: bool = False, **config) -> DiT:
    """A dgfast DiT holding the weights of `model_or_state_dict` (see the module docstring);
    share=True: the given tensors themselves where the layout allows, copies elsewhere."""
    unknown = set(config) - set(_DIT_KEYS)
    if unknown:
        raise TypeError(f"to_dgfast: unknown config keys {sorted(unknown)}; DiT takes {list(_DIT_KEYS)}")
    src = _unwrap_module(model_or_state_dict)
    if isinstance(src, DiT):
        if config:  # a dgfast DiT is returned as it is: a config could only be ignored
            raise TypeError(f"to_dgfast: the model is already a dgfast DiT; config {sorted(config)} cannot apply")
        return src
    source = _Source(src, share)
    if _is_diffusers_dit(src):
        sd, cfg = from_diffusers(src.state_dict(), dict(src.config), pos_embed=src.pos_embed.pos_embed)
        return _build(sd, {**cfg, **config}, src.training, source)
    if isinstance(src, nn.Module):
        sd = src.state_dict()
        base = _without_adapters(sd) if share else sd
        if not all(k in base for k in _UPSTREAM_MARKERS):
            raise _unsupported(src)
        cfg = {**upstream_config(base, _module_hints(src)), **config}
        return _share_modules(src, base, cfg, source) if share else _build(sd, cfg, src.training, source)
    if isinstance(src, Mapping):
        sd = _unwrap_checkpoint(src)
        if all(k in sd for k in _UPSTREAM_MARKERS):
            return _build(sd, {**upstream_config(sd, config), **config}, False, source)
        if all(k in sd for k in _DIFFUSERS_MARKERS):
            if "input_size" not in config:
                raise ValueError("to_dgfast: a diffusers state_dict has no pos_embed (diffusers recomputes it); "
                                 "pass input_size= (the latent size, diffusers' sample_size)")
            sd, cfg = from_diffusers(sd, _diffusers_config_from(sd, config))
            return _build(sd, {**cfg, **config}, False, source)
        raise ValueError(f"to_dgfast: a state_dict with neither upstream DiT keys {list(_UPSTREAM_MARKERS)} nor "
                         f"diffusers DiT keys {list(_DIFFUSERS_MARKERS)}; first keys: {list(sd)[:5]}")
    raise _unsupported(src)


class _Source:
    """The conversion's source: its name for the report and, with share=True, the storages of the
    tensors it holds (a converted tensor on one of them is shared, anything else a copy)."""

    def __init__(self, src, share: bool):
        self.share = share
        if isinstance(src, nn.Module):
            self.name = f"{type(src).__module__}.{type(src).__name__}"
            tensors = list(src.parameters()) + list(src.buffers())
        elif isinstance(src, Mapping):
            self.name = "a state_dict"
            tensors = [v for v in _unwrap_checkpoint(src).values() if isinstance(v, torch.Tensor)]
        else:  # not convertible: to_dgfast raises before it builds anything
            self.name, tensors = type(src).__name__, []
        self.storages = {_storage(t) for t in tensors} if share else set()

    def report(self, sd: dict, cfg: dict) -> ConversionReport:
        shared, copied = {}, {}
        for k, v in sd.items():
            (shared if _storage(v) in self.storages else copied)[k] = v.numel() * v.element_size()
        note = ("diffusers' numerics kept (freq_divisor=127, mlp_norm_eps=norm_eps)"
                if cfg.get("freq_divisor") == 127 else "")
        return ConversionReport(self.name, shared, copied, note)


def _storage(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else None


def _meta_dit(sd: dict, cfg: dict) -> DiT:
    """DiT(**cfg) on the meta device (no init compute, no RNG use), after checking that sd's keys
    and shapes are exactly its own."""
    with torch.device("meta"):
        model = DiT(**cfg)
    missing, unexpected = _key_diff(model, sd)
    if missing or unexpected:
        raise ValueError(f"to_dgfast: the weights do not fit DiT({cfg}): missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for k, v in sd.items():
        want = shapes[k]
        if v.shape != want:
            raise ValueError(f"to_dgfast: {k} has shape {tuple(v.shape)}, DiT({cfg}) needs {tuple(want)}")
    return model


def _build(sd: dict, cfg: dict, training: bool, source: _Source) -> DiT:
    model = _meta_dit(sd, cfg)
    # assign=True keeps the given tensors (wrapped as Parameters aliasing them); clone() copies them
    model.load_state_dict({k: v.detach() if source.share else v.detach().clone() for k, v in sd.items()},
                          strict=True, assign=True)
    model.conversion = source.report(sd, cfg)
    return model.train(training)


# Upstream's layer modules, which a shared conversion takes over as they are (with any peft adapter)
_LAYERS = ("x_embedder.proj", "t_embedder.mlp", "y_embedder.embedding_table", "final_layer.linear",
           "final_layer.adaLN_modulation")
_BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation")


def _without_adapters(sd: dict) -> dict:
    """sd as the base model's keys: peft's wrapped layers (`.base_layer.`) under their own names,
    adapter tensors (`lora_*`) left out."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items()
            if not any(part.startswith("lora_") for part in k.split("."))}


def _share_modules(src: nn.Module, sd: dict, cfg: dict, source: _Source) -> DiT:
    """share=True for an upstream-layout module: dgfast's DiT around src's own layer modules (the
    Linears, the patch Conv2d, the label Embedding and the Sequentials holding them) and its
    pos_embed Parameter. Adapters on those layers (peft LoRA) and their hooks come along, and the
    pair sees them (a LoRA fine-tune shares its base GEMM); only the containers between are new."""
    model = _meta_dit(sd, cfg)
    paths = list(_LAYERS) + [f"blocks.{i}.{p}" for i in range(cfg["depth"]) for p in _BLOCK_LAYERS]
    try:
        layers = {p: src.get_submodule(p) for p in paths}
    except AttributeError as err:
        raise ValueError(f"to_dgfast: {type(src).__name__} has upstream DiT's keys but not its modules: {err}") \
            from None
    for p, layer in layers.items():
        model.set_submodule(p, layer)
    pe = src.pos_embed
    model.pos_embed = pe if isinstance(pe, nn.Parameter) else nn.Parameter(pe.detach(), requires_grad=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left and not pe.is_meta:
        raise ValueError(f"to_dgfast: {type(src).__name__}'s modules leave {left[:4]} unset")
    shared = {id(m) for layer in layers.values() for m in layer.modules()}
    for m in model.modules():  # the new containers take the source's mode; its own layers keep theirs
        if id(m) not in shared:
            m.training = src.training
    model.conversion = source.report(model.state_dict(), cfg)
    return model


def _key_diff(model, sd):
    want = set(model.state_dict())
    return sorted(want - set(sd)), sorted(set(sd) - want)


def _unwrap_module(obj):
    """The model inside torch.compile's wrapper (_orig_mod) and DataParallel / DDP (.module)."""
    while isinstance(obj, nn.Module):
        inner = getattr(obj, "_orig_mod", None) or (
            obj.module if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _unwrap_checkpoint(ckpt: Mapping) -> Mapping:
    for key in ("ema", "model"):  # train.py: {"model", "ema", "opt", "args"}; find_model prefers ema
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    if ckpt and all(isinstance(k, str) and k.startswith("module.") for k in ckpt):  # saved from DDP
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


def _is_diffusers_dit(obj) -> bool:
    if not isinstance(obj, nn.Module) or type(obj).__name__ != "DiTTransformer2DModel":
        return False
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return False
    return isinstance(obj, DiTTransformer2DModel)


# ----------------------------------------------------------------------------------------------
# Upstream layout
# ----------------------------------------------------------------------------------------------

def _module_hints(m: nn.Module) -> dict:
    """Config values only the module knows (upstream DiT and ReferenceDiT keep these attributes)."""
    hints = {}
    if isinstance(getattr(m, "num_heads", None), int):
        hints["num_heads"] = m.num_heads
    y = getattr(m, "y_embedder", None)
    if y is not None:
        if isinstance(getattr(y, "num_classes", None), int):
            hints["num_classes"] = y.num_classes
        if isinstance(getattr(y, "dropout_prob", None), (int, float)):
            hints["class_dropout_prob"] = float(y.dropout_prob)
    return hints


def _heads_for(hidden: int, given) -> int:
    if given is not None:
        return int(given)
    if hidden in _ZOO_HEADS:
        return _ZOO_HEADS[hidden]
    raise ValueError(f"to_dgfast: cannot tell the number of attention heads for hidden size {hidden} from the "
                     f"weights; pass num_heads=")


def upstream_config(sd: Mapping, hints: Mapping = ()) -> dict:
    """DiT(...) keywords read off an upstream state_dict (+ hints for what the weights cannot say)."""
    hints = dict(hints)
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in sd:
        depth += 1
    if "pos_embed" not in sd:
        raise ValueError("to_dgfast: the state_dict has no pos_embed (upstream keeps it in the state_dict)")
    T = sd["pos_embed"].shape[1]
    g = math.isqrt(T)
    if g * g != T:
        raise ValueError(f"to_dgfast: pos_embed has {T} tokens, not a square grid")
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out not in (C, 2 * C):
        raise ValueError(f"to_dgfast: final layer gives {out} channels for {C} input channels")
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    dropout = float(hints.get("class_dropout_prob", 0.1))
    num_classes = int(hints["num_classes"]) if "num_classes" in hints else (rows - 1 if dropout > 0 else rows)
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / D if depth else 4.0
    return dict(input_size=g * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
                num_heads=_heads_for(D, hints.get("num_heads")), mlp_ratio=mlp_ratio, class_dropout_prob=dropout,
                num_classes=num_classes, learn_sigma=out == 2 * C)


# ----------------------------------------------------------------------------------------------
# diffusers layout (scripts/convert_dit_to_diffusers.py, backwards)
# ----------------------------------------------------------------------------------------------

def _diffusers_config_from(sd: Mapping, config: Mapping) -> dict:
    """A diffusers config for a bare diffusers state_dict (what DiTTransformer2DModel.config holds)."""
    D, C, p, _ = sd["pos_embed.proj.weight"].shape
    heads = _heads_for(D, config.get("num_heads"))
    layers = 0
    while f"transformer_blocks.{layers}.norm1.linear.weight" in sd:
        layers += 1
    rows = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0]
    return dict(num_attention_heads=heads, attention_head_dim=D // heads, in_channels=C,
                out_channels=sd["proj_out_2.weight"].shape[0] // (p * p), num_layers=layers,
                sample_size=config["input_size"], patch_size=p, num_embeds_ada_norm=rows - 1,
                norm_eps=config.get("mlp_norm_eps", 1e-5), activation_fn="gelu-approximate",
                norm_type="ada_norm_zero", norm_elementwise_affine=False)


def from_diffusers(sd: Mapping, config: Mapping, pos_embed: torch.Tensor | None = None) -> tuple[dict, dict]:
    """(upstream state_dict, DiT keywords) from a DiTTransformer2DModel state_dict and config.

    q/k/v are concatenated into qkv; the t/y embedders, copied into every block by diffusers,
    come from block 0 (all copies must be equal); proj_out_1/2 become the final layer.
    """
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or config.get("norm_elementwise_affine"):
        raise ValueError("to_dgfast: only diffusers DiTs with norm_type='ada_norm_zero' and no LayerNorm affine "
                         "parameters map onto DiT")
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"to_dgfast: activation_fn {config['activation_fn']!r}; DiT uses 'gelu-approximate'")
    heads, hd = config["num_attention_heads"], config["attention_head_dim"]
    D, C, p = heads * hd, config["in_channels"], config["patch_size"]
    out_ch = config.get("out_channels") or C
    layers = config["num_layers"]
    src, used, dst = dict(sd), set(), {}

    def take(key):
        if key not in src:
            raise ValueError(f"to_dgfast: the diffusers state_dict lacks {key}")
        used.add(key)
        return src[key]

    def take_linear(dkey, ukey):
        dst[f"{ukey}.weight"] = take(f"{dkey}.weight")
        if f"{dkey}.bias" in src:
            dst[f"{ukey}.bias"] = take(f"{dkey}.bias")

    take_linear("pos_embed.proj", "x_embedder.proj")
    emb = "norm1.emb"
    for dkey, ukey in ((f"{emb}.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                       (f"{emb}.timestep_embedder.linear_2", "t_embedder.mlp.2")):
        take_linear(f"transformer_blocks.0.{dkey}", ukey)
    dst["y_embedder.embedding_table.weight"] = take(f"transformer_blocks.0.{emb}.class_embedder.embedding_table.weight")
    for i in range(layers):
        b = f"transformer_blocks.{i}"
        for name in [k for k in src if k.startswith(f"{b}.{emb}.")]:  # per-block embedder copies
            first = src[name.replace(f"{b}.", "transformer_blocks.0.", 1)]
            if not torch.equal(src[name], first):
                raise ValueError(f"to_dgfast: {name} differs from block 0's copy; DiT has one timestep/label "
                                 f"embedder, so these weights cannot be represented")
            used.add(name)
        take_linear(f"{b}.norm1.linear", f"blocks.{i}.adaLN_modulation.1")
        qkv_w = [take(f"{b}.attn1.to_{c}.weight") for c in "qkv"]
        dst[f"blocks.{i}.attn.qkv.weight"] = torch.cat(qkv_w, dim=0)
        biases = [src.get(f"{b}.attn1.to_{c}.bias") for c in "qkv"]
        used.update(f"{b}.attn1.to_{c}.bias" for c in "qkv")
        dst[f"blocks.{i}.attn.qkv.bias"] = torch.cat([bb if bb is not None else qkv_w[0].new_zeros(D)
                                                      for bb in biases])  # attention_bias=False: zero bias
        take_linear(f"{b}.attn1.to_out.0", f"blocks.{i}.attn.proj")
        take_linear(f"{b}.ff.net.0.proj", f"blocks.{i}.mlp.fc1")
        take_linear(f"{b}.ff.net.2", f"blocks.{i}.mlp.fc2")
    take_linear("proj_out_1", "final_layer.adaLN_modulation.1")
    take_linear("proj_out_2", "final_layer.linear")
    left = sorted(k for k in src if k not in used and k != "pos_embed.pos_embed")
    if left:
        raise ValueError(f"to_dgfast: diffusers weights with no DiT counterpart: {left[:6]}")
    size = config["sample_size"]
    if pos_embed is None:
        pos_embed = src.get("pos_embed.pos_embed")
    if pos_embed is None:  # not persistent in diffusers: the same MAE table diffusers computes
        from dgfast.models import sincos_pos_embed
        pos_embed = torch.from_numpy(sincos_pos_embed(D, size // p)).unsqueeze(0)
    ref = dst["x_embedder.proj.weight"]
    dst["pos_embed"] = pos_embed.to(device=ref.device, dtype=ref.dtype)
    for key in [k for k in dst if k.endswith(".weight")]:  # Linears without bias in diffusers: zero bias
        bias = key[:-len("weight")] + "bias"
        if bias not in dst and not key.startswith(("y_embedder", "pos_embed")):
            dst[bias] = dst[key].new_zeros(dst[key].shape[0])
    rows = dst["y_embedder.embedding_table.weight"].shape[0]
    num_classes = config.get("num_embeds_ada_norm") or rows - 1
    cfg = dict(input_size=size, patch_size=p, in_channels=C, hidden_size=D, depth=layers, num_heads=heads,
               mlp_ratio=dst["blocks.0.mlp.fc1.weight"].shape[0] / D if layers else 4.0,
               class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0, num_classes=num_classes,
               learn_sigma=out_ch == 2 * C,
               # diffusers' numerics (module docstring): /127 frequencies, pre-MLP LayerNorm eps norm_eps
               freq_divisor=127, mlp_norm_eps=float(config.get("norm_eps", 1e-5)), norm_eps=1e-6)
    if out_ch not in (C, 2 * C):
        raise ValueError(f"to_dgfast: out_channels {out_ch} is neither in_channels nor 2*in_channels")
    return dst, cfg


# ----------------------------------------------------------------------------------------------
# dgfast DiT -> upstream's own module
# ----------------------------------------------------------------------------------------------

def to_upstream(dit: DiT) -> nn.Module:
    """dgfast.reference.ReferenceDiT (upstream DiT's module tree and forward, op for op) on dit's own
    tensors (no copy; same device, dtype and mode): what `dgfast sample --exact` runs, so a run
    gives the upstream scripts' bits. Only upstream numerics can be expressed there."""
    from dgfast.reference import ReferenceDiT

    if not isinstance(dit, DiT):
        raise ValueError(f"to_upstream: dit must be a dgfast.models.DiT, got {type(dit).__name__}")
    cfg = dit.config
    if (cfg["freq_divisor"], cfg["norm_eps"], cfg["mlp_norm_eps"]) != (None, 1e-6, 1e-6):
        raise ValueError("to_upstream: dit runs diffusers' numerics (freq_divisor / LayerNorm eps), which "
                         "upstream's module cannot express")
    with torch.device("meta"):  # no init compute, no RNG use; the weights come from dit
        model = ReferenceDiT(**{k: cfg[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                                    "num_heads", "mlp_ratio", "class_dropout_prob", "num_classes",
                                                    "learn_sigma")})
    model.load_state_dict({k: v.detach() for k, v in dit.state_dict().items()}, strict=True, assign=True)
    return model.train(dit.training)


# ----------------------------------------------------------------------------------------------
# dgfast DiT -> diffusers layout (the inverse of from_diffusers)
# ----------------------------------------------------------------------------------------------

def to_diffusers(dit: DiT):
    """A diffusers DiTTransformer2DModel holding the weights of the dgfast DiT `dit` (copied; same
    device, dtype and train/eval mode), the inverse of `to_dgfast` on a diffusers model.

    Mapping: attn.qkv is split into attn1.to_q / to_k / to_v; the one t/y embedder is copied into
    every block's norm1.emb (diffusers keeps one per block); adaLN_modulation -> norm1.linear;
    mlp.fc1 / fc2 -> ff.net.0.proj / ff.net.2; the final layer -> proj_out_1 / proj_out_2; dgfast's
    pos_embed is copied into diffusers' (non-persistent, recomputed) pos_embed.pos_embed buffer.
    Config: norm_type "ada_norm_zero", norm_elementwise_affine False, activation_fn
    "gelu-approximate", sample_size=input_size, num_embeds_ada_norm=num_classes, out_channels 2C
    when learn_sigma, norm_eps=dit.mlp_norm_eps (the pre-MLP LayerNorm, diffusers' only configurable eps).

    diffusers runs its own numerics (module docstring): timestep frequencies exp(-ln(1e4) k / 127)
    (dgfast's freq_divisor=127; upstream DiT and dgfast's default divide by 128) and LayerNorm eps
    1e-6 before attention and the final layer (dgfast's norm_eps). So a DiT with upstream numerics
    (freq_divisor=None, e.g. dgfast.zoo's models or the hub's DiT weights) gives slightly different
    outputs once in diffusers, as the hub's diffusers DiT does next to upstream DiT. The round trip
    `to_dgfast(to_diffusers(m))` has m's state_dict tensors bit for bit, with diffusers' numerics
    (freq_divisor=127, mlp_norm_eps = the config's norm_eps): it reproduces the diffusers model, not m.
    diffusers' label dropout (training only) is fixed at 0.1 whatever m's class_dropout_prob.

    Raises ValueError naming `dit` for what diffusers cannot hold: a non-DiT input, a label table
    without the null row (class_dropout_prob=0: diffusers always adds it), mlp_ratio other than 4
    (diffusers' FeedForward width is 4 x hidden), non-square or mismatched weights.
    """
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as e:  # pragma: no cover - diffusers is an optional dependency
        raise ImportError("to_diffusers needs diffusers (pip install dgfast[diffusers])") from e
    if not isinstance(dit, DiT):
        raise ValueError(f"to_diffusers: dit must be a dgfast.models.DiT, got {type(dit).__module__}."
                         f"{type(dit).__name__} (convert it with to_dgfast first)")
    sd = dit.state_dict()
    _check_diffusers_fit(dit, sd)
    D, C, p, depth, heads = dit.hidden_size, dit.in_channels, dit.patch_size, len(dit.blocks), dit.num_heads
    out_ch = dit.out_channels
    dst = _diffusers_state_dict(sd, depth)

    config = dict(num_attention_heads=heads, attention_head_dim=D // heads, in_channels=C, out_channels=out_ch,
                  num_layers=depth, sample_size=dit.input_size, patch_size=p, num_embeds_ada_norm=dit.num_classes,
                  attention_bias=True, activation_fn="gelu-approximate", norm_type="ada_norm_zero",
                  norm_elementwise_affine=False, norm_eps=float(dit.mlp_norm_eps))
    with torch.device("meta"):  # no init compute, no RNG use; the weights come from dst
        model = DiTTransformer2DModel(**config)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(dst)), sorted(set(dst) - set(want))
    if missing or unexpected:
        raise ValueError(f"to_diffusers: dit's weights do not fit DiTTransformer2DModel({config}): "
                         f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    for k, v in dst.items():
        if v.shape != want[k].shape:
            raise ValueError(f"to_diffusers: dit's weight for {k} has shape {tuple(v.shape)}, "
                             f"DiTTransformer2DModel({config}) needs {tuple(want[k].shape)}")
    # contiguous copies: the q/k/v chunks are views, and each block gets its own embedder copy
    model.load_state_dict({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in dst.items()},
                          strict=True, assign=True)
    ref = dst["pos_embed.proj.weight"]
    model.pos_embed.register_buffer("pos_embed", sd["pos_embed"].detach().to(ref.device).clone(), persistent=False)
    return model.train(dit.training)


def _check_diffusers_fit(dit: DiT, sd: dict) -> None:
    """ValueError naming `dit` for what diffusers' DiTTransformer2DModel cannot hold (see to_diffusers)."""
    cfg = dit.config
    D, p, depth = dit.hidden_size, dit.patch_size, len(dit.blocks)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if rows != dit.num_classes + 1:
        raise ValueError(f"to_diffusers: dit has a {rows}-row label table for num_classes={dit.num_classes} "
                         f"(class_dropout_prob={cfg.get('class_dropout_prob')}): diffusers' DiT always has "
                         f"num_classes + 1 rows (the null class), so this table cannot be represented")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * D
    if hidden != 4 * D:
        raise ValueError(f"to_diffusers: dit has an MLP width of {hidden} (mlp_ratio={cfg.get('mlp_ratio')}); "
                         f"diffusers' DiT blocks have 4 * hidden_size = {4 * D}")
    out_ch = dit.out_channels
    if sd["final_layer.linear.weight"].shape[0] != p * p * out_ch:
        raise ValueError(f"to_diffusers: dit's final layer has {sd['final_layer.linear.weight'].shape[0]} "
                         f"outputs, not patch_size^2 * out_channels = {p * p * out_ch}")
    g = dit.input_size // p
    if tuple(sd["pos_embed"].shape) != (1, g * g, D):
        raise ValueError(f"to_diffusers: dit's pos_embed is {tuple(sd['pos_embed'].shape)}, diffusers needs "
                         f"(1, {g * g}, {D}) for input_size {dit.input_size} and patch_size {p}")


def _diffusers_state_dict(sd: dict, depth: int) -> dict:
    """dgfast DiT state_dict -> diffusers DiTTransformer2DModel names (views, not copies): qkv split into
    to_q/to_k/to_v, the one t/y embedder repeated in every block's norm1.emb."""
    dst = {}

    def put(ukey, dkey):
        for s in ("weight", "bias"):
            if f"{ukey}.{s}" in sd:
                dst[f"{dkey}.{s}"] = sd[f"{ukey}.{s}"]

    put("x_embedder.proj", "pos_embed.proj")
    for i in range(depth):
        b, u = f"transformer_blocks.{i}", f"blocks.{i}"
        emb = f"{b}.norm1.emb"
        put("t_embedder.mlp.0", f"{emb}.timestep_embedder.linear_1")
        put("t_embedder.mlp.2", f"{emb}.timestep_embedder.linear_2")
        dst[f"{emb}.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        put(f"{u}.adaLN_modulation.1", f"{b}.norm1.linear")
        for s in ("weight", "bias"):
            for c, part in zip("qkv", sd[f"{u}.attn.qkv.{s}"].chunk(3, dim=0)):
                dst[f"{b}.attn1.to_{c}.{s}"] = part
        put(f"{u}.attn.proj", f"{b}.attn1.to_out.0")
        put(f"{u}.mlp.fc1", f"{b}.ff.net.0.proj")
        put(f"{u}.mlp.fc2", f"{b}.ff.net.2")
    put("final_layer.adaLN_modulation.1", "proj_out_1")
    put("final_layer.linear", "proj_out_2")
    return dst
