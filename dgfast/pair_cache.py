"""The pair cache: one PairedDiT per (fine-tuned, pre-trained) model pair, rebuilt when a weight changed.

A pair holds copies (stacked or prepacked weights) and reads one tensor for layers whose values
were equal, so it must never outlive a weight edit. `fingerprint` (storage pointers and in-place
version counters) catches new tensors and ordinary in-place edits; `sample_views` catches edits
that bump no version counter (`p.data` edits, inference tensors) by comparing sampled values.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from dgfast.models import DiT
from dgfast.paired import PairedDiT, _is_lora


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
    one (every whole-tensor edit does). Edits of a few values elsewhere need
    get_pair(..., rebuild=True). The views alias the weights, so building them once per pair and
    reading them costs one gather per group (~1 ms for two DiT-XL/2 on a CPU).
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


class WeightsIdentity:
    """What identifies two models' weights now; `changed(ft, pre)` says whether they moved since.

    Anything built from the weights and kept across calls (a pair, converted models) stores one
    of these and is rebuilt when it reports a change."""

    def __init__(self, ft: nn.Module, pre: nn.Module):
        self.fingerprint = fingerprint(ft, pre)
        self.views = sample_views(ft, pre)
        self.sample = read_sample(self.views)

    def changed(self, ft: nn.Module, pre: nn.Module) -> bool:
        return self.fingerprint != fingerprint(ft, pre) or not torch.equal(self.sample, read_sample(self.views))


@dataclass
class CacheEntry:
    """A cached pair and the identity of the weights it was built from."""
    pair: PairedDiT
    identity: WeightsIdentity

    @classmethod
    def build(cls, ft: nn.Module, pre: nn.Module) -> "CacheEntry":
        return cls(PairedDiT(ft, pre), WeightsIdentity(ft, pre))

    def stale(self, ft: nn.Module, pre: nn.Module) -> bool:
        return self.identity.changed(ft, pre)


_PAIRS: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def cache_entry(finetuned: DiT, pretrained: DiT) -> CacheEntry | None:
    inner = _PAIRS.get(finetuned)
    return None if inner is None else inner.get(pretrained)


def get_pair(finetuned: DiT, pretrained: DiT, *, rebuild: bool = False) -> PairedDiT:
    """The cached pair for these two model objects, rebuilt when their weights changed (new
    tensors, in-place edits, or edits through .data that touch the sampled values: sample_views)."""
    inner = _PAIRS.get(finetuned)
    if inner is None:
        inner = _PAIRS[finetuned] = weakref.WeakKeyDictionary()
    entry = inner.get(pretrained)
    if entry is None or rebuild or entry.stale(finetuned, pretrained):
        entry = inner[pretrained] = CacheEntry.build(finetuned, pretrained)
    return entry.pair
