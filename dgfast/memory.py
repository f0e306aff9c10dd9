"""Will a batch fit? A lower bound on one batch's memory, checked against what is free before the
sampling loop starts, so that a batch far too large fails with the flag to lower instead of torch's
raw allocation error after the models are loaded and the folder is written.

The bound counts only tensors that must be alive at the same time, so it never refuses a batch that
would fit (it is far below the real peak, which it need not approach to catch the big mistakes):
- DiT forward (n rows; a paired DoG batch runs 2n): inside every block the residual stream h (D per
  token) stays alive while the MLP's hidden activation (mlp_ratio * D per token) is computed, so
  n * tokens * (D + hidden) elements in the weights' dtype.
- VAE decode (diffusers AutoencoderKL): the last decoder stage runs at full resolution with
  block_out_channels[0] channels, and a resnet keeps its input while it computes its output, so
  2 * block_out_channels[0] * H * W elements per image (one image at a time with enable_slicing()).
The two do not overlap in time: the larger one is the bound. Free memory: torch.cuda.mem_get_info
plus what torch's caching allocator holds unused, on CUDA; MemAvailable + SwapFree of
/proc/meminfo on the CPU (no check where there is no /proc/meminfo).
"""
from __future__ import annotations

import torch

GiB = 1 << 30


def dit_bound(model, rows: int) -> tuple[int, str] | None:
    """(bytes, how) for one forward of `rows` rows of a DiT (dgfast or upstream layout), None if its
    layout is not recognised."""
    try:
        hidden = model.blocks[0].mlp.fc1
        tokens = model.pos_embed.shape[1]
        width, inner = hidden.in_features, hidden.out_features
        size = next(model.parameters()).element_size()
    except (AttributeError, IndexError, TypeError, StopIteration):
        return None
    return rows * tokens * (width + inner) * size, f"{rows} rows x {tokens} tokens x ({width} + {inner}) x {size} B"


def vae_bound(vae, images: int, latent_size: int) -> tuple[int, str] | None:
    """(bytes, how) for decoding `images` latents of latent_size x latent_size with a diffusers
    AutoencoderKL, None for another decoder or with tiling on (its tiles bound the memory)."""
    config = getattr(vae, "config", None)
    channels = getattr(config, "block_out_channels", None) if config is not None else None
    if not channels or getattr(vae, "use_tiling", False):
        return None
    try:
        size = next(vae.parameters()).element_size()
    except (AttributeError, StopIteration):
        return None
    if getattr(vae, "use_slicing", False):
        images = 1
    side = latent_size * 2 ** (len(channels) - 1)
    return (images * 2 * channels[0] * side * side * size,
            f"{images} images x 2 x {channels[0]} channels x {side} x {side} x {size} B")


def free_bytes(device) -> int | None:
    """Memory a batch can still use on `device`, None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree") if k in fields) or None
    except (OSError, ValueError):
        return None


def check_batch_memory(model, vae, batch_size: int, latent_size: int | None, device, flag: str) -> None:
    """A ValueError naming `flag` when one batch cannot fit in the free memory of `device` (see the
    module doc); nothing when it may fit or when nothing can be estimated."""
    parts = [("DiT activations", dit_bound(model, batch_size))]
    if vae is not None and latent_size:
        parts.append(("VAE decode", vae_bound(vae, batch_size, latent_size)))
    parts = [(name, b) for name, b in parts if b is not None]
    free = free_bytes(device) if parts else None
    if free is None:
        return
    name, (need, how) = max(parts, key=lambda p: p[1][0])
    if need > free:
        raise ValueError(f"a batch of {batch_size} needs at least {need / GiB:.1f} GiB for its {name} ({how}), "
                         f"but {free / GiB:.1f} GiB are free on {torch.device(device)}: lower {flag}")
