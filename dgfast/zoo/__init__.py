"""dgfast's embedded model pair: a small pre-trained / fine-tuned DiT, for the demo and the tests.

    finetuned, pretrained, info = dgfast.zoo.load_pair()
    x = dgfast.sample(finetuned, pretrained, z, y, guidance_scale=1.2, steps="50",  # RESULTS.md: best w
                      null_label=info["pretrained"]["null_label"], guidance_channels="all")

Files: pretrained.safetensors / finetuned.safetensors (DiT state_dicts, EMA weights),
encoder.safetensors (the metric encoder), zoo.json (configs and training record).
Made by `python -m dgfast.zoo.train`; measured by `python -m dgfast.zoo.evaluate` (RESULTS.md).
"""
from __future__ import annotations

import json
import os

ZOO_DIR = os.path.dirname(os.path.abspath(__file__))


def load_info(zoo_dir: str | None = None) -> dict:
    """zoo.json: both models' configs, null labels, class names, training record."""
    with open(os.path.join(zoo_dir or ZOO_DIR, "zoo.json")) as f:
        return json.load(f)


def load_model(which: str, zoo_dir: str | None = None, device="cpu"):
    """One embedded DiT ("pretrained" or "finetuned") in eval mode."""
    from dgfast.checkpoint import load_checkpoint
    from dgfast.models import DiT
    if which not in ("pretrained", "finetuned"):
        raise ValueError(f"which must be 'pretrained' or 'finetuned', got {which!r}")
    zoo_dir = zoo_dir or ZOO_DIR
    entry = load_info(zoo_dir)[which]
    model = DiT(**entry["config"])
    model.load_state_dict(load_checkpoint(os.path.join(zoo_dir, entry["file"])))
    return model.to(device).eval()


def load_pair(zoo_dir: str | None = None, device="cpu"):
    """(finetuned, pretrained, info): the embedded DiTs in eval mode and zoo.json's contents.

    info["finetuned"]["null_label"] is the fine-tuned model's own null class (plain CFG),
    info["pretrained"]["null_label"] the pre-trained one's (Domain Guidance)."""
    info = load_info(zoo_dir)
    return load_model("finetuned", zoo_dir, device), load_model("pretrained", zoo_dir, device), info
