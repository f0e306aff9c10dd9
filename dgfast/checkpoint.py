"""Loading weights from files: upstream train.py checkpoints (.pt) and safetensors."""
from __future__ import annotations

import os
import pickle
import warnings

import torch


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, torch.Tensor]:
    """A DiT state_dict from `path`.

    `.safetensors` loads directly. `.pt`/`.pth` is first tried with `weights_only=True` (safe);
    upstream train.py checkpoints pickle an argparse Namespace next to the weights, which that
    refuses, so then it is loaded with `weights_only=False` after a warning saying why — only
    do that for files you trust. A dict with an "ema" entry yields the EMA weights (as DiT's
    `find_model`), one with only "model" yields those.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device=str(map_location))
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        warnings.warn(f"{path}: weights_only=True refused it ({reason}); this is expected for upstream train.py "
                      f"checkpoints, which pickle their argparse args. Loading with weights_only=False: "
                      f"only do this for files you trust.", stacklevel=2)
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if isinstance(ckpt, dict) and "ema" in ckpt:
        ckpt = ckpt["ema"]
    elif isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: expected a state_dict (or a dict with an 'ema'/'model' state_dict), "
                         f"got {type(ckpt).__name__}")
    return ckpt


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, os.fspath(path))
