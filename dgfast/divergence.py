"""Finding where a sampling loop diverged: the first step, and whose output it was.

A sampler that goes wrong (a model returning NaN, a guidance scale or checkpoint that makes the
outputs explode) used to be noticed only in the finished samples, with no step and no model named.
`Watch` records, at every step, each sample's largest |value| of the fine-tuned output, the guiding
output and the new x. The records stay on the device: one abs + amax per tensor per step and no
host sync; they are read once, after the loop (`Watch.divergence`). Cost: README.md, "Reliability".

A sample has diverged when its x becomes NaN/inf or leaves the sane range |x| <= SANE_LIMIT at some
step. Nothing a DiT-style sampler computes legitimately comes near the limit (x starts as unit
noise, times a scheduler's init sigma, at most ~15 for diffusers' Euler schedulers, and model
outputs are eps/velocity predictions of order 1), so it only flags runs that are already broken:
the reported case reached 6.9e31.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from dataclasses import dataclass

import torch

SANE_LIMIT = 1e4  # |x| above this at any step: diverged (see the module doc)


@dataclass
class Divergence:
    """What went wrong in one sampling call (rows index the batch)."""
    step: int            # first step (0-based) at which some sample's x was NaN/inf or beyond SANE_LIMIT
    num_steps: int
    source: str          # whose output was bad at that step: a model's name, or "the sampler step"
    rows: list           # every row whose x diverged at some step
    value: float         # the worst |x| of those rows at that step (nan, inf or > SANE_LIMIT)

    @property
    def kind(self) -> str:
        return "NaN/inf" if not math.isfinite(self.value) else f"|x| = {self.value:.3g} > {SANE_LIMIT:g}"

    def where(self) -> str:
        whose = (f"in the {self.source} model's output" if self.source != "the sampler step"
                 else "in the sampler step (the model outputs were finite and in range)")
        return f"first at step {self.step + 1} of {self.num_steps}, {whose}"


class DivergenceWarning(RuntimeWarning):
    """Some samples diverged; `.divergence` holds the details."""

    def __init__(self, message: str, divergence: Divergence):
        super().__init__(message)
        self.divergence = divergence


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """Each row's largest |value| (NaN if it holds one: amax propagates it), in float32, without leaving
    the device. (abs + amax: linalg.vector_norm(ord=inf) computes the same ~15x slower on CPU.)"""
    return t.detach().reshape(len(t), -1).abs().amax(dim=1).float()


class Watch:
    """Per-step records of one sampling loop; see the module doc. names: (fine-tuned, guiding)."""

    def __init__(self, num_steps: int, names=("finetuned", "pretrained")):
        self.num_steps, self.names = num_steps, names
        self.records = []  # (step, |ft| (n,), |guide| (n,) or None, |x| (n,))

    def record(self, step: int, out_ft, out_guide, x) -> None:
        self.records.append((step, _absmax(out_ft), None if out_guide is None else _absmax(out_guide), _absmax(x)))

    def divergence(self) -> Divergence | None:
        """The first divergence, or None. Reads the records from the device once."""
        if not self.records:
            return None
        zeros = torch.zeros_like(self.records[0][3])
        table = torch.stack([torch.stack([ft, zeros if g is None else g, x]) for _, ft, g, x in self.records]).cpu()
        bad = ~(table <= SANE_LIMIT)  # (records, 3, n): NaN compares false, so it counts as bad
        x_bad = bad[:, 2]
        if not x_bad.any():
            return None
        first = int(x_bad.any(dim=1).nonzero()[0])
        rows_now = x_bad[first]
        sources = [name for j, name in enumerate(self.names) if bad[first, j][rows_now].any()]
        worst = table[first, 2][rows_now]
        value = float("nan") if worst.isnan().any() else float(worst.max())
        return Divergence(step=self.records[first][0], num_steps=self.num_steps,
                          source=sources[0] if sources else "the sampler step",
                          rows=x_bad.any(dim=0).nonzero().flatten().tolist(), value=value)


_COLLECTOR: contextvars.ContextVar = contextvars.ContextVar("dgfast_divergence_collector", default=None)


@contextlib.contextmanager
def collect():
    """`with collect() as found:` divergences of the loops run inside are appended to `found` instead
    of being warned about (dgfast sample decides itself what a divergence means for its files)."""
    found = []
    token = _COLLECTOR.set(found)
    try:
        yield found
    finally:
        _COLLECTOR.reset(token)


def warn_divergence(watch: Watch, n: int, stacklevel: int = 3) -> None:
    """A DivergenceWarning naming the samples, the first step and whose output it was, if any diverged
    (inside `collect()`: the Divergence is collected instead)."""
    d = watch.divergence()
    if d is None:
        return
    if _COLLECTOR.get() is not None:
        _COLLECTOR.get().append(d)
        return
    rows = ", ".join(map(str, d.rows[:10])) + (" ..." if len(d.rows) > 10 else "")
    message = (f"dgfast.sample: {len(d.rows)} of {n} samples contain NaN or infinite values or left the sane range "
               f"|x| <= {SANE_LIMIT:g} (rows {rows}): {d.kind} {d.where()}")
    warnings.warn(DivergenceWarning(message, d), stacklevel=stacklevel)
