"""The pair cache: one PairedDiT per (fine-tuned, pre-trained) model pair, rebuilt when a weight changed.

A pair holds copies (stacked or prepacked weights) and reads one tensor for layers whose values
were equal, so it must never outlive a weight edit. `WeightsIdentity` is the rule, kept by
anything built from the weights: `fingerprint` (storage pointers, in-place version counters, peft
adapter state, train flags) catches new tensors and ordinary in-place edits; edits through `p.data`
(EMA updates, weights loaded into existing tensors) and edits of inference tensors move no version
counter, so by default `content_digest` also reads every value of every tensor. There is no cheap
exact rule: nothing records a `.data` write. The opt-out (exact=False, or DGFAST_WEIGHTS_CHECK=
sampled) compares a few sampled values per tensor instead, which misses edits of a few values
between them.

What the exact check costs: per value, one int32 dot product with a fixed multiplier vector (8
bytes read) and one float32 row sum (4 bytes read): ~12 bytes of memory traffic per float32
value. Measured on one core of the project's 2-core AVX2 EPYC (the dot product is single-threaded):
51-60 ms per 50M values while other jobs loaded the machine (~1 ns per value, ~12 GB/s; the
same ops reach ~20 GB/s on an idle core). Two DiT-XL/2 (2 x 675M values, 5.4 GB) therefore take
~0.8-1.4 s there, once per `dgfast.sample` call (and per loop of `dog_forward`); on a GPU
(~3 TB/s) a few ms. Tensors the two models share (a LoRA fine-tune's base) are read once.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from dgfast.models import DiT
from dgfast.paired import PairedDiT, _is_lora

CHECKS = ("exact", "sampled")  # DGFAST_WEIGHTS_CHECK values


def fingerprint(ft: nn.Module, pre: nn.Module) -> tuple:
    """Cheap identity of both models' weights: storage pointer and in-place version counter of
    every parameter and buffer, plus peft adapter state and train/eval flags."""
    items = []
    for m in (ft, pre):
        for t in list(m.parameters()) + list(m.buffers()):
            try:
                v = t._version
            except RuntimeError:  # inference tensors carry no version counter
                v = -1
            items.append((id(t), t.data_ptr(), v))
        for mod in m.modules():
            if _is_lora(mod):
                items.append((id(mod), tuple(mod.active_adapters), bool(mod.disable_adapters), bool(mod.merged),
                              tuple(sorted(getattr(mod, "scaling", {}).items()))))  # set_scale / scale_layer
        items.append(m.training)
    return tuple(items)


def sample_views(ft: nn.Module, pre: nn.Module, per_tensor: int = 16) -> list:
    """Views of up to `per_tensor` evenly spaced values of every floating parameter and buffer,
    grouped by (device, dtype): read_sample(views) reads their current values.

    The pair holds copies (stacked or prepacked weights) and reads one tensor for layers whose
    values were equal. Edits through `p.data` (`p.data.mul_`, `p.data.copy_`: EMA updates, weight
    loading into existing tensors) and in-place edits of inference tensors change no version
    counter, so `fingerprint` alone misses them; the sampled values catch any edit that touches
    one (every whole-tensor edit does), not edits of a few values elsewhere: this is the opt-out
    check (WeightsIdentity(exact=False)). The views alias the weights, so building them once per
    pair and reading them costs one gather per group (~1 ms for two DiT-XL/2 on a CPU).
    """
    groups: dict = {}
    for m in (ft, pre):
        for t in list(m.parameters()) + list(m.buffers()):
            if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":  # meta: no values
                continue
            t = t.detach()
            if t.is_contiguous():  # a strided 1-D view of the whole tensor
                view = t.view(-1)[::max(1, t.numel() // per_tensor)][:per_tensor]
            else:  # reshape would copy (and miss later edits): rows of the tensor itself, flattened when read
                view = t[::max(1, t.shape[0] // per_tensor)]
            groups.setdefault((t.device, t.dtype), []).append(view)
    return list(groups.values())


def read_sample(views: list, per_tensor: int = 16) -> torch.Tensor:
    """The sampled values' bit patterns (int64), compared bit for bit (NaN weights equal themselves)."""
    parts = [torch.cat([v if v.dim() == 1 else v.reshape(-1)[:per_tensor] for v in group])
             .cpu().to(torch.float64)  # exact for every float dtype; cast on the CPU (MPS has no float64)
             for group in views]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)).view(torch.int64)


_BLOCK = 1 << 20      # multipliers are made in blocks of this many values, each from its own seed
_ROW = 1024           # values per partial sum of content_digest's float sums
_MULTIPLIERS: dict = {}  # device -> odd pseudo-random int32 multipliers (grown by blocks; a prefix never changes)


def _multipliers(device: torch.device, numel: int) -> torch.Tensor:
    have = _MULTIPLIERS.get(device)
    size = 0 if have is None else have.numel()
    if size < numel:
        blocks = [torch.randint(-2 ** 31, 2 ** 31, (_BLOCK,), dtype=torch.int32,
                                generator=torch.Generator().manual_seed(0x5EED + k)) | 1
                  for k in range(size // _BLOCK, -(-numel // _BLOCK))]
        new = torch.cat(blocks).to(device)
        have = _MULTIPLIERS[device] = new if have is None else torch.cat([have, new])
    return have[:numel]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns as a flat int32 tensor (a view where the layout allows; 1- and 2-byte
    values widened, 8- and 16-byte ones split into int32 words)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    size = t.element_size()
    if size == 4:
        return t.view(torch.int32).reshape(-1)
    flat = t.reshape(-1)
    if size > 4:
        return flat.view(torch.int32)
    return flat.view(torch.int16 if size == 2 else torch.uint8).to(torch.int32)


def _weighted_sum(bits: torch.Tensor) -> torch.Tensor:
    """sum(bits * r) for the fixed odd multipliers r: any single changed value changes it (r is
    odd, so r * delta is never 0 modulo 2**32); several changed values cancel only by a
    coincidence of ~2**-32 -- unless they all move by the same power of two, which the float
    sums of content_digest catch."""
    r = _multipliers(bits.device, bits.numel())
    if bits.device.type == "cpu":
        return torch.dot(bits, r).to(torch.int64)  # wraps modulo 2**32, in any summation order
    return (bits * r).sum(dtype=torch.int64)      # no integer dot on GPUs; exact in int64


def _float_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive _ROW values in float32: a whole-tensor scaling or sign flip changes them
    (while moving every value's bits by the same power of two). Rows are summed one per thread, so
    the result does not depend on the thread count."""
    flat = t.detach().reshape(-1)
    m = flat.numel() // _ROW * _ROW
    return torch.cat([flat[:m].view(-1, _ROW).sum(1, dtype=torch.float32),
                      flat[m:].sum(0, keepdim=True, dtype=torch.float32)])


def content_digest(ft: nn.Module, pre: nn.Module) -> tuple:
    """Two integers per parameter and buffer of both models (shared tensors once) that change
    whenever any value does: _weighted_sum of its bits, and of its float row sums' bits. Reads
    every value; see the module docstring for the cost. Meta tensors (no values) are skipped."""
    parts: dict = {}
    seen: set = set()
    with torch.inference_mode():  # reads inference tensors too; bumps nothing
        for m in (ft, pre):
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) in seen or t.numel() == 0 or t.device.type == "meta":
                    continue
                seen.add(id(t))
                t = t.detach()
                out = parts.setdefault(t.device, [])
                out.append(_weighted_sum(_bits(t)))
                if t.is_floating_point():
                    out.append(_weighted_sum(_float_sums(t).view(torch.int32)))
        return tuple(v for out in parts.values() for v in torch.stack(out).tolist())  # one sync per device


def _exact_by_default(exact: bool | None) -> bool:
    if exact is not None:
        return bool(exact)
    check = os.environ.get("DGFAST_WEIGHTS_CHECK", "exact") or "exact"
    if check not in CHECKS:
        raise ValueError(f"DGFAST_WEIGHTS_CHECK must be one of {CHECKS}, got {check!r}")
    return check == "exact"


class WeightsIdentity:
    """What identifies two models' weights now; `changed(ft, pre)` says whether they moved since.

    Anything built from the weights and kept across calls (a pair, converted models) stores one
    of these and is rebuilt when it reports a change. exact (default True, or
    DGFAST_WEIGHTS_CHECK=exact|sampled when None): read every value (content_digest; ~1 s for
    two DiT-XL/2 on one CPU core, see the module docstring) or, as an opt-out, compare a few
    sampled values per tensor (sample_views; ~1 ms, misses edits of a few values between them).
    The fingerprint (tensor identities, version counters, adapter state, train flags) is always checked.
    """

    def __init__(self, ft: nn.Module, pre: nn.Module, exact: bool | None = None):
        self.exact = _exact_by_default(exact)
        self.fingerprint = fingerprint(ft, pre)
        if self.exact:
            self.digest = content_digest(ft, pre)
        else:
            self.views = sample_views(ft, pre)
            self.sample = read_sample(self.views)

    def changed(self, ft: nn.Module, pre: nn.Module) -> bool:
        if self.fingerprint != fingerprint(ft, pre):
            return True
        if self.exact:
            return self.digest != content_digest(ft, pre)
        return not torch.equal(self.sample, read_sample(self.views))


@dataclass
class CacheEntry:
    """A cached pair and the identity of the weights it was built from."""
    pair: PairedDiT
    identity: WeightsIdentity

    @classmethod
    def build(cls, ft: nn.Module, pre: nn.Module, exact: bool | None = None) -> "CacheEntry":
        return cls(PairedDiT(ft, pre), WeightsIdentity(ft, pre, exact))

    def stale(self, ft: nn.Module, pre: nn.Module) -> bool:
        return self.identity.changed(ft, pre)


_PAIRS: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def cache_entry(finetuned: DiT, pretrained: DiT) -> CacheEntry | None:
    inner = _PAIRS.get(finetuned)
    return None if inner is None else inner.get(pretrained)


def get_pair(finetuned: DiT, pretrained: DiT, *, rebuild: bool = False, exact: bool | None = None,
             checked: bool = False) -> PairedDiT:
    """The cached pair for these two model objects, rebuilt when their weights changed: new
    tensors, in-place edits, and (exact, the default) any changed value, however it was written;
    exact=False (or DGFAST_WEIGHTS_CHECK=sampled) checks sampled values only (WeightsIdentity).
    checked=True: the caller has just found these weights unchanged (dgfast.convert checks the
    source modules its DiTs share every tensor with), so the same check is not run twice."""
    inner = _PAIRS.get(finetuned)
    if inner is None:
        inner = _PAIRS[finetuned] = weakref.WeakKeyDictionary()
    entry = inner.get(pretrained)
    if entry is not None and entry.identity.exact != _exact_by_default(exact):
        entry = None  # the other kind of check: start from a fresh identity
    if entry is None or rebuild or (not checked and entry.stale(finetuned, pretrained)):
        entry = inner[pretrained] = CacheEntry.build(finetuned, pretrained, exact)
    return entry.pair
