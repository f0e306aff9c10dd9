"""Sampling plan: DiT's diffusion schedule as data.

Everything here mirrors DiT's `diffusion/` package numerically: tables are built in float64
numpy, indexed, and only then rounded once to float32 (`_extract_into_tensor` does exactly
that), so every per-step scalar is f32(float64 value). Recomputing them in float32 gives
different bits and breaks bit-faithfulness of the sampler step.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from dgfast.ops import NUM_COEFS

NUM_TRAIN_STEPS = 1000

# Per-step scalar slots of the fused step (ops.NUM_COEFS), one float32 row per step (see ops.guided_step).
# DDPM (learned-range variance):  A, B, C1, C2, Lmin, Lmax, mask
# DDIM:                           A, B, sqrt(abar_prev), sqrt(1-abar_prev-sigma^2), mask*sigma


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Kept timesteps (sorted) for a respacing spec, with DiT's exact rules.

    `section_counts` is an int, a string "250" / "10,15,20" / "ddimN", or a list of ints.
    Even-section strides accumulate in float and round with Python's half-to-even `round`.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"steps: cannot parse {section_counts!r}; expected e.g. 'ddim50'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"steps: {section_counts!r} cannot be made with an integer stride over "
                             f"{num_timesteps} training steps")
        try:
            section_counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f"steps: cannot parse {section_counts!r}; expected an int, '250', "
                             f"'10,15,20' or 'ddimN'") from None
    counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"steps: every section count must be >= 1, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"steps: cannot divide a section of {size} training steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))  # Python round: half to even, as DiT
            cur += stride
        start += size
    return sorted(set(kept))


def base_betas(num_timesteps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """DiT's linear schedule (float64)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


@dataclass(frozen=True)
class Schedule:
    """Respaced float64 tables, index j over kept steps (0 = least noisy)."""
    timestep_map: np.ndarray   # (S,) int64, original training index of step j
    betas: np.ndarray          # (S,) float64, respaced betas

    @classmethod
    def from_steps(cls, steps, num_timesteps: int = NUM_TRAIN_STEPS) -> "Schedule":
        if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
            steps = int(steps)  # numpy integers too
        if isinstance(steps, bool) or not isinstance(steps, (int, str, list, tuple)):
            raise TypeError(f"steps must be an int or a respacing string, got {type(steps).__name__}")
        if isinstance(steps, int) and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        use = set(space_timesteps(num_timesteps, steps if not isinstance(steps, int) else str(steps)))
        alphas_cumprod = np.cumprod(1.0 - base_betas(num_timesteps), axis=0)
        last, new_betas, tmap = 1.0, [], []
        for i, ac in enumerate(alphas_cumprod):  # SpacedDiffusion.__init__
            if i in use:
                new_betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        return cls(np.array(tmap, dtype=np.int64), np.array(new_betas, dtype=np.float64))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    # Derived arrays exactly as GaussianDiffusion.__init__ computes them (float64).
    @property
    def tables(self) -> dict[str, np.ndarray]:
        b = self.betas
        alphas = 1.0 - b
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(
            np.array([max(post_var[0], 1e-20)]))
        return {
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_log_variance_clipped": post_logvar_clipped,
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(b),
        }

    def ddpm_coefs(self) -> np.ndarray:
        """(S, NUM_COEFS) float32: A, B, C1, C2, Lmin, Lmax, mask for each step j."""
        t = self.tables
        cols = [t["sqrt_recip_alphas_cumprod"], t["sqrt_recipm1_alphas_cumprod"],
                t["posterior_mean_coef1"], t["posterior_mean_coef2"],
                t["posterior_log_variance_clipped"], t["log_betas"]]
        out = np.zeros((self.num_steps, NUM_COEFS), dtype=np.float32)
        for k, col in enumerate(cols):
            out[:, k] = col.astype(np.float32)  # f32(float64): one rounding, as _extract_into_tensor
        out[:, 6] = (np.arange(self.num_steps) != 0).astype(np.float32)
        return out

    def ddim_coefs(self, eta: float) -> np.ndarray:
        """(S, NUM_COEFS) float32: A, B, sqrt(abp), sqrt(1-abp-sigma^2), mask*sigma, 0, 0.

        sigma and the two roots are float32 arithmetic on f32 table values in ddim_sample's
        op order, so the result is bit-equal to the reference's tensor ops.
        """
        import torch
        t = self.tables
        out = np.zeros((self.num_steps, NUM_COEFS), dtype=np.float32)
        out[:, 0] = t["sqrt_recip_alphas_cumprod"].astype(np.float32)
        out[:, 1] = t["sqrt_recipm1_alphas_cumprod"].astype(np.float32)
        ab = torch.from_numpy(t["alphas_cumprod"]).float()
        abp = torch.from_numpy(t["alphas_cumprod_prev"]).float()
        sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
        out[:, 2] = torch.sqrt(abp).numpy()
        out[:, 3] = torch.sqrt(1 - abp - sigma ** 2).numpy()
        mask = (torch.arange(self.num_steps) != 0).float()
        out[:, 4] = (mask * sigma).numpy()
        return out
