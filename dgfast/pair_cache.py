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

What the exact check costs: one read of every value. On the CPU it is one C++ call over all
tensors (weights_digest in csrc/dgfast_ops.cpp: two 32-bit hash sums of each tensor's bytes,
threaded, order-free), or its torch twin `_digest_torch` without the extension; on a GPU a
linear hash of the bits plus float row sums (`_digest_linear`: a few kernels per tensor, a few ms
at GPU bandwidth). Measured 2026-12-07 on one core of an
Intel Xeon VM (AVX-512): two DiT-S/2 (65.4M values, 262 MB) 37 ms on one thread, 21 ms on two
(the torch formulation it replaced: 71 ms, ~12 bytes of traffic per value); 0.42 ns per value in
cache on AVX-512, 0.59 on AVX2. Two DiT-XL/2 (2 x 675M values) are therefore ~0.4 s on one such
core, once per `dgfast.sample` call (and per loop of `dog_forward`). Tensors the two models share
(a LoRA fine-tune's base) are read once.
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


_KEY = 0x9E3779B9     # word i's key: i * _KEY modulo 2**32
_MASK = 0xFFFFFFFF
_CHUNK = 1 << 22      # words per step of the torch twin (bounds its int64 temporaries)


def _words(t: torch.Tensor) -> torch.Tensor:
    """t's bytes (in memory order, contiguous) as little-endian 32-bit words, each an int64 in
    [0, 2**32); a last partial word is zero-padded."""
    if t.is_complex():
        t = torch.view_as_real(t)
    b = t.contiguous().reshape(-1).view(torch.uint8)
    if b.numel() % 4:
        b = torch.cat([b, b.new_zeros(4 - b.numel() % 4)])
    b = b.view(-1, 4).to(torch.int64)  # bytes to words by arithmetic: any storage offset, any byte order
    return b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values (products wrap in
    int64; their low 32 bits are the uint32 product's)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


def _digest_torch(t: torch.Tensor) -> torch.Tensor:
    """One tensor's digest as an int64 scalar tensor on its device: the torch twin of the C++
    weights_digest (csrc/dgfast_ops.cpp), which has the definition and why it is exact."""
    w = _words(t)
    s1 = s2 = torch.zeros((), dtype=torch.int64, device=w.device)
    for i0 in range(0, w.numel(), _CHUNK):
        part = w[i0:i0 + _CHUNK]
        k = (torch.arange(i0, i0 + part.numel(), dtype=torch.int64, device=w.device) * _KEY) & _MASK
        s1 = s1 + _fmix32(part ^ k).sum()
        s2 = s2 + _fmix32((part + k) & _MASK).sum()
    return ((s2 & _MASK) << 32) | (s1 & _MASK)  # int64 bits of (sum2 << 32) | sum1


# The GPU digest: a few kernels per tensor (the torch twin of the C++ op above takes ~25, and a
# GPU call is launch-bound): two integers per tensor, _weighted_sum of its bits and of its float
# row sums' bits. Different integers from the CPU's, which is fine: a digest is only ever compared
# with one taken on the same device.

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
    return (bits * r).sum(dtype=torch.int64)  # exact in int64 (no integer dot on GPUs)


def _float_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive _ROW values in float32: a whole-tensor scaling or sign flip changes them
    (while moving every value's bits by the same power of two). Rows are summed one per thread, so
    the result does not depend on the thread count."""
    flat = t.detach().reshape(-1)
    m = flat.numel() // _ROW * _ROW
    return torch.cat([flat[:m].view(-1, _ROW).sum(1, dtype=torch.float32),
                      flat[m:].sum(0, keepdim=True, dtype=torch.float32)])


def _digest_linear(t: torch.Tensor) -> list:
    out = [_weighted_sum(_bits(t))]
    if t.is_floating_point():
        out.append(_weighted_sum(_float_sums(t).view(torch.int32)))
    return out


def _cpp_digest():
    """The C++ weights_digest, or None (no extension, or one built before it existed)."""
    from dgfast.ops import cpp_extension
    ext = cpp_extension()
    return getattr(ext, "weights_digest", None) if ext is not None else None


def content_digest(ft: nn.Module, pre: nn.Module) -> tuple:
    """One 64-bit integer per parameter and buffer of both models (shared tensors once) that
    changes whenever any value does (two 32-bit hash sums over its bytes; see weights_digest in
    csrc/dgfast_ops.cpp). Reads every value once; see the module docstring for the cost. CPU
    tensors go to the C++ op in one call (its torch twin without the extension); GPU tensors to
    _digest_linear (two integers each, a few kernels). Meta tensors (no values) are skipped."""
    groups: dict = {}
    seen: set = set()
    with torch.inference_mode():  # reads inference tensors too; bumps nothing
        for m in (ft, pre):
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) in seen or t.numel() == 0 or t.device.type == "meta":
                    continue
                seen.add(id(t))
                groups.setdefault(t.device, []).append(t.detach())
        out = []
        for device, tensors in groups.items():
            cpp = _cpp_digest() if device.type == "cpu" else None
            if cpp is not None:
                out += cpp([t.contiguous() for t in tensors]).tolist()  # contiguous(): a no-op for most
            elif device.type == "cpu":
                out += torch.stack([_digest_torch(t) for t in tensors]).tolist()
            else:
                out += torch.stack([v for t in tensors for v in _digest_linear(t)]).tolist()  # one sync
        return tuple(out)


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
    DGFAST_WEIGHTS_CHECK=exact|sampled when None): read every value (content_digest; ~0.4 s for
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
