"""The embedded pair's two domains, rendered procedurally from scikit-learn's 8x8 digits.

Every image is one of the 1797 `load_digits` glyphs (8x8, 17 grey levels), upsampled, thickened,
moved by a random affine map at 32x32, coloured and area-downsampled to 16x16 (anti-aliased):

- **source** ("many inks"): all ten digits, ink and paper colours drawn uniformly from the RGB cube
  (with a minimum luminance contrast), flat paper, any stroke weight, +-15 degree rotation. The broad
  domain the model is pre-trained on (the ImageNet of this toy).
- **target** ("black on a yellow-to-cyan wash"): five digits (0, 2, 4, 6, 8 = target classes 0..4)
  in black ink on paper that fades from yellow at the top to cyan at the bottom, medium strokes,
  nearly upright. The colours are corners of the source's RGB cube, the vertical wash is outside
  the source (source paper is flat): a real shift the fine-tune must learn, as a photo domain's
  lighting or texture is new to ImageNet. Every channel of the target's colours is 0 or 1, so
  guidance that extrapolates the appearance past the target (DoG's domain term does: README's
  model card) is clamped away when samples become pixels (DiT's scripts clamp every sample to 0..255);
  a first target inside the cube (teal on a sand-to-mint wash) let DoG overshoot it, and DoG's lead
  over CFG then depended on the pre-trained draw. Fine-tuning sees only `SHOTS` glyphs per class.
- **probe** (encoder training only): any ink, any paper (flat or gradient), any weight: a superset
  of both domains, so the metric encoder is not tuned to either.

The glyphs are split once, per class, into a train half (pre-training, the few-shot picks, the
encoder) and a held-out half (the reference images the target FD is measured against).
Images are uint8-quantised (like real data) and returned in [-1, 1], shape (N, 3, 16, 16).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16          # the models' resolution (twice the glyphs' own: large enough to see the modes differ)
RENDER_SIZE = 32         # rendered at this size, then area-downsampled to IMAGE_SIZE (anti-aliasing)
CHANNELS = 3
TARGET_DIGITS = (0, 2, 4, 6, 8)       # target class k is digit TARGET_DIGITS[k]
SHOTS = 20                            # few-shot: fine-tuning glyphs per target class
SPLIT_SEED = 1234


def load_glyphs():
    """(glyphs (1797, 8, 8) float32 in [0, 1], digit labels (1797,) int64)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED):
    """Per-class half split: (train indices, held-out indices), fixed by `seed`."""
    rng = np.random.RandomState(seed)
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        half = len(idx) // 2
        train.append(idx[:half])
        held.append(idx[half:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def few_shot_indices(labels: np.ndarray, train_idx: np.ndarray, shots: int = SHOTS, seed: int = SPLIT_SEED):
    """`shots` train-split glyphs per target digit; returns (indices, target labels 0..K-1)."""
    rng = np.random.RandomState(seed + 1)
    idx, lab = [], []
    for k, digit in enumerate(TARGET_DIGITS):
        pool = train_idx[labels[train_idx] == digit]
        pick = np.sort(rng.choice(pool, shots, replace=False))
        idx.append(pick)
        lab.append(np.full(shots, k, dtype=np.int64))
    return np.concatenate(idx), np.concatenate(lab)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def _luma(c: torch.Tensor) -> torch.Tensor:
    return c @ torch.tensor([0.299, 0.587, 0.114])


def _contrasting_colours(n: int, g: torch.Generator, min_contrast: float = 0.35):
    """Ink and paper colours uniform in the RGB cube, resampled until |luma difference| >= min_contrast."""
    ink, paper = torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g)
    bad = (_luma(ink) - _luma(paper)).abs() < min_contrast
    while bad.any():
        m = int(bad.sum())
        ink[bad], paper[bad] = torch.rand(m, 3, generator=g), torch.rand(m, 3, generator=g)
        bad = (_luma(ink) - _luma(paper)).abs() < min_contrast
    return ink, paper


def render(glyphs: np.ndarray | torch.Tensor, ink, paper_top, paper_bottom, weight, angle_deg, scale,
           shift) -> torch.Tensor:
    """Glyphs (N, 8, 8) in [0, 1] -> images (N, 3, IMAGE_SIZE, IMAGE_SIZE) in [-1, 1], uint8-quantised.

    weight: (N,) stroke-weight exponent (mask ** weight; < 1 thickens); angle_deg, scale: (N,);
    shift: (N, 2) in units of the image half-width; colours: (N, 3) in [0, 1].
    """
    m = torch.as_tensor(glyphs, dtype=torch.float32)[:, None]
    n = m.shape[0]
    R = RENDER_SIZE
    m = F.interpolate(m, size=(R, R), mode="bilinear", align_corners=False)
    m = m.clamp(0, 1) ** weight.view(n, 1, 1, 1)
    a = angle_deg * math.pi / 180
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, R, R), align_corners=False)
    m = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    s = torch.linspace(0, 1, R).view(1, 1, R, 1)
    paper = paper_top[:, :, None, None] * (1 - s) + paper_bottom[:, :, None, None] * s
    img = paper * (1 - m) + ink[:, :, None, None] * m
    if R != IMAGE_SIZE:
        img = F.avg_pool2d(img, R // IMAGE_SIZE)
    img = torch.round(img.clamp(0, 1) * 255) / 255  # quantise like an 8-bit image
    return img * 2 - 1


def _uniform(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def source_style(n: int, g: torch.Generator) -> dict:
    ink, paper = _contrasting_colours(n, g)
    return dict(ink=ink, paper_top=paper, paper_bottom=paper.clone(), weight=_uniform(n, 0.5, 1.5, g),
                angle_deg=_uniform(n, -15, 15, g), scale=_uniform(n, 0.85, 1.1, g),
                shift=(torch.rand(n, 2, generator=g) - 0.5) * 0.2)


TARGET_INK = (0.0, 0.0, 0.0)      # black
TARGET_PAPER = (1.0, 1.0, 0.0)    # yellow, at the top of the paper
TARGET_WASH = (0.0, 1.0, 1.0)     # cyan, at the bottom


def target_style(n: int, g: torch.Generator) -> dict:
    """Black ink on a yellow-to-cyan vertical wash, medium strokes, nearly upright. Colours as the
    source could draw them (its cube's corners), the wash as it never does (source paper is flat)."""
    def jitter(c, s):
        return (torch.tensor(c) + s * torch.randn(n, 3, generator=g)).clamp(0, 1)
    paper = jitter(TARGET_PAPER, 0.04)
    ink = jitter(TARGET_INK, 0.04)
    return dict(ink=ink, paper_top=paper, paper_bottom=jitter(TARGET_WASH, 0.04),
                weight=_uniform(n, 0.7, 1.0, g), angle_deg=_uniform(n, -5, 5, g), scale=_uniform(n, 0.92, 1.05, g),
                shift=(torch.rand(n, 2, generator=g) - 0.5) * 0.1)


def probe_style(n: int, g: torch.Generator) -> dict:
    """A superset of both domains for the metric encoder: any colours, flat or gradient paper."""
    ink, top = _contrasting_colours(n, g)
    _, bottom = _contrasting_colours(n, g)
    flat = torch.rand(n, generator=g) < 0.5
    bottom = torch.where(flat[:, None], top, bottom)
    # keep ink readable against the bottom colour too
    far = (_luma(ink) - _luma(bottom)).abs() < 0.25
    bottom[far] = top[far]
    return dict(ink=ink, paper_top=top, paper_bottom=bottom, weight=_uniform(n, 0.3, 1.6, g),
                angle_deg=_uniform(n, -15, 15, g), scale=_uniform(n, 0.85, 1.1, g),
                shift=(torch.rand(n, 2, generator=g) - 0.5) * 0.2)


def style_vector(style: dict) -> torch.Tensor:
    """(N, 10) appearance targets for the encoder: ink, paper top, paper bottom, stroke weight."""
    return torch.cat([style["ink"], style["paper_top"], style["paper_bottom"], style["weight"][:, None]], 1)


def draw(glyphs: np.ndarray, n: int, style_fn, g: torch.Generator, return_style: bool = False):
    """n renders of glyphs picked uniformly (with replacement) in `style_fn`'s style.
    Returns (images, glyph indices) or (images, glyph indices, style)."""
    pick = torch.randint(0, len(glyphs), (n,), generator=g)
    style = style_fn(n, g)
    imgs = render(glyphs[pick.numpy()], **style)
    return (imgs, pick, style) if return_style else (imgs, pick)


class Domains:
    """All the data the zoo uses, fixed by SPLIT_SEED: glyph splits, few-shot picks, reference set."""

    def __init__(self):
        self.glyphs, self.digits = load_glyphs()
        self.train_idx, self.held_idx = split_indices(self.digits)
        self.shot_idx, self.shot_labels = few_shot_indices(self.digits, self.train_idx)
        # held-out target glyphs (for the reference set) and their target labels
        digit_to_target = {d: k for k, d in enumerate(TARGET_DIGITS)}
        held_t = self.held_idx[np.isin(self.digits[self.held_idx], TARGET_DIGITS)]
        self.held_target_idx = held_t
        self.held_target_labels = np.array([digit_to_target[d] for d in self.digits[held_t]], dtype=np.int64)

    def source_batch(self, n: int, g: torch.Generator):
        """Pre-training batch: (images, digit labels 0..9)."""
        idx = self.train_idx[torch.randint(0, len(self.train_idx), (n,), generator=g).numpy()]
        return render(self.glyphs[idx], **source_style(n, g)), torch.from_numpy(self.digits[idx])

    def target_batch(self, n: int, g: torch.Generator):
        """Fine-tuning batch from the few-shot glyphs: (images, target labels 0..K-1)."""
        pick = torch.randint(0, len(self.shot_idx), (n,), generator=g).numpy()
        idx = self.shot_idx[pick]
        return render(self.glyphs[idx], **target_style(n, g)), torch.from_numpy(self.shot_labels[pick])

    def probe_batch(self, n: int, g: torch.Generator):
        """Encoder batch (train-split glyphs): (images, digit labels, appearance targets (N, 10))."""
        idx = self.train_idx[torch.randint(0, len(self.train_idx), (n,), generator=g).numpy()]
        style = probe_style(n, g)
        return render(self.glyphs[idx], **style), torch.from_numpy(self.digits[idx]), style_vector(style)

    def reference_target(self, renders_per_glyph: int = 4, seed: int = 77):
        """Held-out target images: every held-out target glyph rendered `renders_per_glyph` times
        in the target style. Returns (images, target labels)."""
        g = torch.Generator().manual_seed(seed)
        idx = np.repeat(self.held_target_idx, renders_per_glyph)
        lab = np.repeat(self.held_target_labels, renders_per_glyph)
        return render(self.glyphs[idx], **target_style(len(idx), g)), torch.from_numpy(lab)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), as sample_ddp.py does it."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
