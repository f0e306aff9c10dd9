"""Loading weights from files: upstream train.py checkpoints (.pt) and safetensors."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pickle
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

# The only non-tensor object an upstream DiT train.py checkpoint pickles: its argparse args.
# It is plain data (a __dict__ of str/int/float), so the safe unpickler may rebuild it.
SAFE_GLOBALS = [argparse.Namespace]
_ZIP_MAGIC = b"PK\x03\x04"      # torch.save's format since torch 1.6
_PICKLE_PROTO = b"\x80"         # legacy torch.save format starts with a protocol >= 2 pickle
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong."""


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """A DiT state_dict from `path`.

    `.safetensors` loads directly. `.pt`/`.pth` loads with `weights_only=True` (safe), with
    argparse.Namespace allowed so that upstream train.py checkpoints (which pickle their args)
    load too. A file that pickles anything else is refused (CheckpointError) unless
    `trusted=True`, which loads it with `weights_only=False`: that runs whatever code the
    pickle holds, so only pass it for files whose source you trust. A dict with an "ema" entry
    yields the EMA weights (as DiT's `find_model`), one with only "model" yields those.
    Corrupt, empty or truncated files raise CheckpointError (a ValueError) naming the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.endswith(".safetensors"):
        return _load_safetensors(path, map_location)
    ckpt = _load_pickle(path, map_location, trusted)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace) and "ema" in ckpt:
        # find_model's choice, said out loud: "model" holds the raw (non-EMA) weights
        warnings.warn(f"{path}: an upstream train.py checkpoint (loaded with weights_only=True, its argparse "
                      f"args allowed): using its 'ema' weights, not 'model'", stacklevel=2)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("ema"), dict):
        ckpt = ckpt["ema"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path}: expected a state_dict (or a dict with an 'ema'/'model' state_dict), "
                              f"got {type(ckpt).__name__}")
    return ckpt


def _load_safetensors(path: str, map_location) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device=str(map_location))
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a valid .safetensors file (corrupt or truncated?): {err}") from None


def _load_pickle(path: str, map_location, trusted: bool):
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    try:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        with _safe_globals():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _GLOBAL.search(str(err))
        if refused and not trusted:
            raise CheckpointError(
                f"{path}: refused to unpickle {refused.group(1)}: weights_only loading allows tensors, plain "
                f"containers and argparse.Namespace only, and a full pickle load could run arbitrary code. If "
                f"you trust the file's source, pass trusted=True (dgfast sample: --trust-checkpoint)") from None
        raise CheckpointError(f"{path}: corrupt checkpoint: {_unpickler_reason(err)}") from None
    except (ImportError, AttributeError, TypeError, KeyError, IndexError) as err:  # trusted: a foreign pickle
        raise CheckpointError(f"{path}: cannot unpickle it: {type(err).__name__}: {_first_line(err)}") from None
    except EOFError:  # the pickle stops early
        raise CheckpointError(f"{path}: truncated checkpoint (the pickle ends early)") from None
    except RuntimeError as err:  # torch's zip reader on a damaged archive, or an unusable map_location
        what = "corrupt or truncated checkpoint" if "PytorchStreamReader" in str(err) else "cannot load it"
        raise CheckpointError(f"{path}: {what}: {_first_line(err)}") from None


def _safe_globals():
    """A context in which weights_only loading accepts SAFE_GLOBALS (torch >= 2.4)."""
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):  # torch >= 2.5: scoped to this load
        return ser.safe_globals(SAFE_GLOBALS)
    if hasattr(ser, "add_safe_globals"):  # torch 2.4: process-wide, but Namespace is harmless
        ser.add_safe_globals(SAFE_GLOBALS)
    return contextlib.nullcontext()


def _unpickler_reason(err: BaseException) -> str:
    """torch's weights_only error is a paragraph of advice; the cause follows 'WeightsUnpickler error:'."""
    text = str(err)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()] if marker else []
    return lines[0] if lines else _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, os.fspath(path))


def weights_digest(model: torch.nn.Module, threads: int | None = None) -> str:
    """'sha256:<hex>' over every byte of every tensor of the model's state_dict, with its name, shape
    and dtype. `dgfast sample --resume` compares it, so a checkpoint edited or replaced at the same
    path (one weight changed is enough) is refused instead of mixing two models' samples in one
    folder. Each tensor is hashed on its own (in `threads` threads: hashlib releases the GIL, and a
    GPU tensor is copied to the CPU one at a time per thread), then the per-tensor digests are hashed
    in state_dict order. Cost: README.md, "Reliability"."""
    items = list(model.state_dict().items())
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(_tensor_sha256, (t for _, t in items)))
    h = hashlib.sha256()
    for (name, t), d in zip(items, digests):
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
        h.update(d)
    return "sha256:" + h.hexdigest()


def _tensor_sha256(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1).contiguous()
    data = flat.cpu() if flat.device.type != "cpu" else flat
    return hashlib.sha256(memoryview(data.view(torch.uint8).numpy())).digest()


def sampled_weights_digest(model: torch.nn.Module, per_tensor: int = 64) -> str:
    """The digest dgfast recorded before the full one: names, shapes, dtypes and up to 64 evenly
    spaced values per tensor (an edit elsewhere in a tensor goes unnoticed). Kept only to resume
    folders whose manifest.json holds it; new manifests record weights_digest instead."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        picked = flat[::max(1, flat.numel() // per_tensor)][:per_tensor]
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
        h.update(picked.to("cpu", torch.float64 if t.is_floating_point() else torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]
