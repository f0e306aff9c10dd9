"""The models on the user's path: what dgfast.sample, dog_forward, sample_to_dir and DoGDiTPipeline run.

    dgfast_models(ft, pre) -> (DiT | None, DiT | None)   the dgfast DiT to run in place of each
    report(ft, pre) -> str                                what was converted, shared and copied

Upstream-layout DiT modules (DiT's models.py on timm layers, dgfast.reference.ReferenceDiT) and
diffusers DiTTransformer2DModel are converted to dgfast's fused DiT on the given tensors
(adapters.to_dgfast(share=True): the upstream layout shares every tensor, diffusers' separate q/k/v
are concatenated into a copy). A conversion is used only after the converted model gave the
source's output on one probe input (the state_dict layout says nothing about a module's forward:
SiT's backbone has DiT's keys and another forward), and it is cached per source model pair and
rebuilt when a source weight changes (pair_cache.WeightsIdentity, the pair cache's own rule).
Anything else runs as given, with one line on the `dgfast` logger saying why, once per model.
The callers' `exact=True` skips all of this (the models as given, for the scripts' bits).

Also here, for the same callers: a backend applied to dgfast DiTs for the length of one call and
restored afterwards (`forward_backend`), and torch.compile'd forwards (`compiled`).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from dgfast.adapters import _UPSTREAM_MARKERS, _is_diffusers_dit, _unwrap_module, _without_adapters, to_dgfast
from dgfast.models import DiT

logger = logging.getLogger("dgfast")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_NO_MODEL = nn.Module()  # stands for "no pre-trained model" in cache keys and weight identities
_NO_MODEL.eval()


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    """One source pair's conversions: per side the converted DiT or None (runs as given), why not."""
    models: tuple
    why: tuple
    identity: object  # pair_cache.WeightsIdentity of the two sources
    hooks: tuple      # _not_shareable of each source when built (hooks come and go without a weight change)


_CACHE: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()
_OWNED: weakref.WeakSet[DiT] = weakref.WeakSet()  # DiTs this module made (their compiled forwards live on them)
_SAID: weakref.WeakSet = weakref.WeakSet()        # models whose "runs as given" line was logged


def dgfast_models(finetuned, pretrained=None) -> tuple:
    """(ft, pre): the dgfast DiT to run in place of each model -- the model itself when it is one
    (inside torch.compile / DataParallel / DDP wrappers too), its cached conversion, or None when it
    runs as given (logged once per model). pretrained None gives (ft, None)."""
    srcs = tuple(None if m is None else _unwrap_module(m) for m in (finetuned, pretrained))
    for role, s in zip(("finetuned", "pretrained"), srcs):
        if s is not None and not isinstance(s, nn.Module):
            _say_once(s, role, "it is not an nn.Module", logging.INFO)
    if not any(_convertible_kind(s) for s in srcs):
        return tuple(s if isinstance(s, DiT) else None for s in srcs)
    entry = _entry(*srcs)
    return tuple(s if isinstance(s, DiT) else conv for s, conv in zip(srcs, entry.models))


def converted(given: tuple, run: tuple) -> bool:
    """Whether every model in `run` is a conversion that dgfast_models made of the model in `given`
    in this call: their weights were just checked against the sources (whose tensors they share or
    copy), so the pair cache need not read them all again (pair_cache.get_pair(checked=True))."""
    return all(r is not g and isinstance(r, DiT) and r in _OWNED for g, r in zip(given, run))


def _convertible_kind(s) -> bool:
    return isinstance(s, nn.Module) and not isinstance(s, DiT)


def _entry(ft: nn.Module, pre: nn.Module | None) -> _Entry:
    from dgfast.pair_cache import WeightsIdentity

    pre_key = _NO_MODEL if pre is None else pre
    inner = _CACHE.get(ft)
    if inner is None:
        inner = _CACHE[ft] = weakref.WeakKeyDictionary()
    entry = inner.get(pre_key)
    hooks = tuple(_not_shareable(s) if _convertible_kind(s) else "" for s in (ft, pre))
    if entry is None or entry.hooks != hooks or entry.identity.changed(ft, pre_key):
        models, why = [], []
        for role, s in (("finetuned", ft), ("pretrained", pre)):
            if role == "pretrained" and s is ft:  # one model guiding itself: one conversion
                conv, reason = models[0], why[0]
            elif _convertible_kind(s):
                conv, reason = _convert(s)
                if conv is None:
                    _say_once(s, role, reason, logging.WARNING)
            else:
                conv, reason = None, ""
            models.append(conv)
            why.append(reason)
        entry = inner[pre_key] = _Entry(tuple(models), tuple(why), WeightsIdentity(ft, pre_key), hooks)
    return entry


def _convert(src: nn.Module) -> tuple[DiT | None, str]:
    """(dgfast DiT sharing src's tensors, '') or (None, why it runs as given)."""
    why = _not_shareable(src)
    if why:
        return None, why
    if not _is_diffusers_dit(src) and not all(k in _without_adapters(src.state_dict()) for k in _UPSTREAM_MARKERS):
        return None, "not a DiT: its state_dict has neither upstream DiT's nor diffusers' DiT keys"
    try:
        dit = to_dgfast(src, share=True)
    except Exception as err:  # noqa: BLE001 - whatever stops a conversion, the model still runs as given
        return None, f"{type(err).__name__}: {err}" if not isinstance(err, (TypeError, ValueError)) else str(err)
    why = _probe(src, dit)
    if why:
        return None, why
    _OWNED.add(dit)
    return dit, ""


def _not_shareable(src: nn.Module) -> str:
    """Why a converted model would not compute what src computes although the weights agree: a
    hook or a forward replaced on an instance (accelerate's offload, diffusers' hook registry,
    monkeypatching) runs only inside the source's own module tree."""
    for name, m in src.named_modules():
        where = f"submodule {name}" if name else "the model"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{where} has forward hooks, which a converted model would skip"
        if "forward" in vars(m) or hasattr(m, "_hf_hook"):
            return f"{where} has its forward replaced (offload or other hooks), which a converted model would skip"
    return ""


def _probe(src: nn.Module, dit: DiT) -> str:
    """'' when dit gives src's output on one fixed input, else the difference in words. The input
    comes from a private generator (the global RNG is untouched)."""
    from dgfast.samplers import model_output

    p = next(dit.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, dit.in_channels, dit.input_size, dit.input_size, generator=g).to(p.device)
    t = torch.full((1,), 500, dtype=torch.long, device=p.device)
    y = torch.zeros(1, dtype=torch.long, device=p.device)
    # Half-precision upstream modules run under autocast (their timestep MLP gets float32 features)
    half = p.dtype in (torch.float16, torch.bfloat16)
    try:
        with torch.no_grad(), torch.autocast(p.device.type, dtype=p.dtype, enabled=half):
            if _is_diffusers_dit(src):
                want = src(x.to(p.dtype), timestep=t, class_labels=y).sample
            else:
                want = model_output(src(x.to(p.dtype), t, y))
        with torch.no_grad():
            got = dit(x, t, y)
    except Exception as err:  # noqa: BLE001 - any failure means: run the source as given
        return f"the probe forward failed ({type(err).__name__}: {err})"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        shape = tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__
        return f"its forward returns {shape}, upstream DiT's forward {tuple(got.shape)} (another forward)"
    want, got = want.float(), got.float()
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    low = p.dtype != torch.float32 or (p.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    tol = 2e-2 if low else 1e-3  # conversions agree to ~1e-6 in float32; another forward is off by O(1)
    if not err <= tol * scale + 1e-6:  # NaN fails too
        return (f"its forward differs from upstream DiT's on a probe input (max |diff| {err:.3g} vs max |out| "
                f"{scale:.3g}): not the forward its weights suggest")
    return ""


def _say_once(model, role: str, why: str, level: int) -> None:
    try:
        if model in _SAID:
            return
        _SAID.add(model)
    except TypeError:  # not weak-referenceable: said on every call
        pass
    logger.log(level, "the %s model (%s) runs as given, not as dgfast's fused DiT: %s", role,
               f"{type(model).__module__}.{type(model).__name__}", why)


def report(finetuned, pretrained=None) -> str:
    """What dgfast.sample (exact=False) runs for these models: per model, its conversion (which
    tensors are shared with it and which were copied), a dgfast DiT as given, or why it runs as given."""
    srcs = tuple(None if m is None else _unwrap_module(m) for m in (finetuned, pretrained))
    dits = dgfast_models(*srcs)
    entry = _entry(*srcs) if any(_convertible_kind(s) for s in srcs) else None
    lines = []
    for i, (role, s, d) in enumerate(zip(("finetuned", "pretrained"), srcs, dits)):
        if s is None:
            continue
        if d is s:
            lines.append(f"{role}: a dgfast DiT, run as given")
        elif d is not None:
            lines.append(f"{role}: " + str(d.conversion).replace("\n", "\n" + " " * (len(role) + 2)))
        else:
            why = entry.why[i] if entry is not None and entry.why[i] else "it is not an nn.Module"
            lines.append(f"{role}: runs as given ({type(s).__name__}): {why}")
    return "\n".join(lines)


def models_to_run(finetuned, pretrained, exact: bool) -> tuple:
    """(ft, pre) for a sampling call: the given models when exact, else their dgfast DiTs where
    there are some (dgfast_models), the given models elsewhere."""
    if exact:
        return finetuned, pretrained
    ft, pre = dgfast_models(finetuned, pretrained)
    return (finetuned if ft is None else ft), (pretrained if pre is None else pre)


# ----------------------------------------------------------------------------------------------
# Backend for one call
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def forward_backend(models, backend: str | None):
    """Inside the block, the dgfast DiTs among `models` run their fused ops with `backend`
    (None: their own setting); their settings are restored afterwards, even on an error."""
    dits = {id(m): m for m in models if isinstance(m, DiT)}.values() if backend is not None else ()
    saved = [(m, m.backend, [blk.mlp.backend for blk in m.blocks]) for m in dits]
    try:
        for m in dits:
            m.set_backend(backend)
        yield
    finally:
        for m, own, mlps in saved:
            m.backend = own
            for blk, b in zip(m.blocks, mlps):
                blk.mlp.backend = b


def runner(model, backend: str | None, mode: str | None):
    """model as the sampler calls it: compiled (compiled) and, for a dgfast DiT, with `backend` set
    for each call and restored after it (None: the model's own setting)."""
    fn = compiled(model, mode)
    if backend is None or not isinstance(model, DiT):
        return fn

    def run(*args, **kwargs):
        with forward_backend((model,), backend):
            return fn(*args, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

def compile_mode(value) -> str | None:
    """compile= as a torch.compile mode (None: off); a ValueError naming `compile` otherwise."""
    if value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {value!r}")


def compiled(fn, mode: str | None):
    """fn under torch.compile(mode=mode, dynamic=False) -- each batch shape compiles once and is
    reused; fn unchanged when mode is None or fn is neither an nn.Module nor a bound method.

    The compiled function is kept on its owner when dgfast owns it (a pair's forward_pair, a DiT
    converted here): one per owner and mode. A user's own module gets a fresh wrapper per call
    rather than an attribute it would then carry (and pickle); dynamo keeps the compiled code per
    code object and reuses it, so it is still compiled once."""
    if mode is None:
        return fn
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if owner is None:
        return fn
    from dgfast.paired import PairedDiT
    if not (isinstance(owner, PairedDiT) or (isinstance(owner, DiT) and owner in _OWNED)):
        return torch.compile(fn, mode=mode, dynamic=False)
    cache = vars(owner).setdefault("_dgfast_compiled", {})  # vars(): not registered as a submodule
    key = (getattr(fn, "__name__", "__call__"), mode)
    if key not in cache:
        cache[key] = torch.compile(fn, mode=mode, dynamic=False)
    return cache[key]
