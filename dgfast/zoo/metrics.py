"""Offline quality metrics for the embedded pair: target FD and target-class accuracy.

**Target FD** is the Fréchet distance between Gaussians fitted to encoder features of generated
images and of held-out target-domain images (FID's formula; FID = the same with Inception-v3
pool features). **Accuracy** is how often the encoder's digit head reads the requested class.

Why this encoder is a fair stand-in for Inception here. FID's Inception network is (1) trained
for a discriminative task on a broad image distribution that is neither the generator's training
set nor tied to the method being compared, (2) sensitive to both content (class) and appearance
(colour, texture), and (3) frozen during the comparison. The `Encoder` below is the same thing at
the toy's scale: a small CNN trained once by `dgfast.zoo.train`, before and independently of any
sampling, on *probe* renders (`data.probe_style`: any ink, flat or gradient paper of any colour,
any stroke weight) of the train-split glyphs, to name the digit and regress the appearance (ink,
paper top/bottom colour, stroke weight). The probe distribution is a superset of both the source
and the target domain, so the features are not tuned to the target style or to any guidance mode,
and they see exactly the two things DoG can change: which digit is drawn and whether it is drawn in
the target's style. The held-out reference glyphs are never shown to the encoder nor to either
diffusion model. Its 128-d penultimate layer plays Inception's pool3 (2048-d) role; with 128-d
features, 1000+ samples per mode give a stable covariance (FD's bias shrinks with n/d).
Numbers are comparable only within this toy (like FID, not across feature extractors).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_DIM = 128
STYLE_DIM = 10


class Encoder(nn.Module):
    """size x size RGB (a power of two >= 4) -> 128-d features; heads: digit logits (10) and
    appearance (10). Stride-2 convolutions halve the image down to 2x2."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        if image_size < 4 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 4, got {image_size}")
        layers, width, size = [nn.Conv2d(3, 48, 3, padding=1), nn.GELU()], 48, image_size
        while size > 2:
            layers += [nn.Conv2d(width, 96, 3, stride=2, padding=1), nn.GELU()]
            width, size = 96, size // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(96 * 4, FEATURE_DIM)
        self.digit_head = nn.Linear(FEATURE_DIM, 10)
        self.style_head = nn.Linear(FEATURE_DIM, STYLE_DIM)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.digit_head(f), self.style_head(f)


@torch.no_grad()
def encode(encoder: Encoder, images: torch.Tensor, batch: int = 1000):
    """(features (N, 128) float64 numpy, digit predictions (N,) int64 numpy) for images in [-1, 1].
    Images are quantised to uint8 first, as saved PNGs would be (sample_ddp.py's rounding)."""
    feats, preds = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float().cpu()
        x = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).float() / 127.5 - 1.0
        f = encoder.features(x)
        feats.append(f.double().numpy())
        preds.append(encoder.digit_head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def gaussian_stats(features: np.ndarray):
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the trace of the root taken as
    sum(sqrt(eig(S1^(1/2) S2 S1^(1/2)))) (symmetric PSD, so no complex parts to drop)."""
    w, V = np.linalg.eigh(sigma1)
    s1h = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    m = s1h @ sigma2 @ s1h
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_root)


@torch.no_grad()
def wash(encoder: Encoder, features: np.ndarray) -> float:
    """The encoder's mean reading of how much the paper's colour changes from top to bottom: the RGB
    distance between its paper-bottom and paper-top outputs (data.style_vector's slots 6:9 and 3:6).
    About 1.19 for target renders (0.34 for the teal pair's target), 0.09 for the source's flat paper:
    the one appearance trait of the target that the source never has, so it shows whether a mode under-
    or overshoots the domain shift."""
    style = encoder.style_head(torch.from_numpy(features).float()).numpy()
    return float(np.linalg.norm(style[:, 6:9] - style[:, 3:6], axis=1).mean())


class TargetMetric:
    """Target FD, class accuracy and the wash reading against the held-out target reference set."""

    def __init__(self, encoder: Encoder, reference_images: torch.Tensor, target_digits):
        self.encoder = encoder.eval()
        self.target_digits = np.asarray(target_digits)
        feats, _ = encode(self.encoder, reference_images)
        self.mu, self.sigma = gaussian_stats(feats)
        self.reference_wash = wash(self.encoder, feats)

    def __call__(self, images: torch.Tensor, target_labels: torch.Tensor) -> dict:
        feats, preds = encode(self.encoder, images)
        mu, sigma = gaussian_stats(feats)
        want = self.target_digits[np.asarray(target_labels.cpu())]
        return {"fd": frechet_distance(mu, sigma, self.mu, self.sigma),
                "accuracy": float((preds == want).mean()), "wash": wash(self.encoder, feats), "n": int(len(images))}


def load_metric(zoo_dir: str | None = None) -> TargetMetric:
    """The shipped encoder with the held-out target reference set (dgfast.zoo.data.Domains)."""
    import os
    from dgfast.checkpoint import load_checkpoint
    from dgfast.zoo import data
    zoo_dir = zoo_dir or os.path.dirname(os.path.abspath(__file__))
    enc = Encoder(data.IMAGE_SIZE)
    enc.load_state_dict(load_checkpoint(os.path.join(zoo_dir, "encoder.safetensors")))
    ref, _ = data.Domains().reference_target()
    return TargetMetric(enc.eval(), ref, data.TARGET_DIGITS)
