"""FID-scale sampling into a folder: one file per sample, single process or under torchrun.

`sample_to_dir` writes `{index:06d}.png` (or `.npy` latents when there is no VAE), each file
written atomically, then `{sample_dir}.npz` with `arr_0` for the ADM evaluator. It reads
RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them and uses NCCL on CUDA, gloo on CPU.

Two seed modes:

- "per-sample" (default): sample i depends only on (global_seed, i).
      seed_i  = (i + global_seed * 0x9E3779B9) mod 2**32   (the latent and step noise generator)
      label_i = randint(num_classes) from a CPU torch.Generator seeded with seed_i XOR 0x5BD1E995
  Seeds are 32-bit because torch's CPU generator ignores the high 32 bits of a seed. For one
  global seed i -> seed_i is a bijection, so no two samples share a stream; with global_seed 0
  the seeds are 0..N-1, as EDM2's `--seeds 0-49999`; other global seeds start far apart
  (golden-ratio steps), so runs with different global seeds share no seed unless N is huge.
  Indices are cut into blocks of `batch_size` (block k = [k*b, (k+1)*b)); rank r takes blocks
  r, r+W, ... and always computes whole blocks. So with the same batch size every sample is
  computed in the same batch at the same row, whatever the world size or the resume point, and
  files are bitwise identical on the same hardware (and, on CPU, thread count). With another
  batch size the random inputs are identical and the pixels agree up to the batch-size-dependent
  rounding of the GEMM/conv kernels (BLAS rounds a row differently by batch size and position).
- "reference": DiT's `sample_ddp.py` / DoG's `sample_dog_ddp.py` stream. seed = global_seed *
  world + rank, torch.manual_seed(seed) (right before sampling: on CUDA the scripts' model
  construction never touches the CUDA generator), then per iteration randn z (n, C, L, L),
  randint y (n,), S noise draws over the doubled batch; file index = i*world + rank + it*n*world.
  Resume skips finished iterations by replaying their random draws (cheap: no model calls).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dgfast.divergence import collect
from dgfast.manifest import check_resume, folder_manifest, record_checksums, write_manifest
from dgfast.memory import check_batch_memory
from dgfast.sample_dir import (ChecksumLog, FolderLock, FolderLocked, check_bytes, file_checksum, known_checksums,
                               lock_holder, read_sample_bytes, record_divergence, redraw_damaged,
                               remove_checksum_logs, remove_divergence_records, write_atomic)

LATENT_SCALE = 0.18215          # SD VAE latent scaling used by DiT (latents / 0.18215 before decode)
SEED_MODES = ("per-sample", "reference")
SEED_STEP = 0x9E3779B9          # 2**32 / golden ratio: spreads the global seeds' seed ranges apart
LABEL_SALT = 0x5BD1E995         # label generator seed = noise seed XOR this: another stream
MAX_INDEX = 1 << 32
_SAMPLE_FILE = re.compile(r"^(\d{6,})\.(png|npy)$")


# ----------------------------------------------------------------------------------------------
# Seeds, labels, quantisation
# ----------------------------------------------------------------------------------------------

def sample_seed(global_seed: int, index: int) -> int:
    """Seed of sample `index`'s noise generator in per-sample mode (32 bits: torch's CPU
    generator drops the high bits of larger seeds, which would make global seeds collide)."""
    return (index + global_seed * SEED_STEP) % MAX_INDEX


def sample_label(global_seed: int, index: int, num_classes: int) -> int:
    """Class label of sample `index` in per-sample mode (device independent: CPU generator)."""
    g = torch.Generator().manual_seed(sample_seed(global_seed, index) ^ LABEL_SALT)
    return int(torch.randint(0, num_classes, (1,), generator=g))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 on the CPU, exactly as DiT's sample_ddp.py.

    `clamp(127.5*x + 128, 0, 255)` then truncation: round-half-up of 127.5x + 127.5. torch.round
    (half-to-even) would differ on exact ties, and skipping the clamp would wrap at the edges.
    """
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False   # this call created the process group (and so should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """The process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Reuses an existing group; a single process without torchrun gets rank 0 of 1 and no group.
    """
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # device_id: barriers know their GPU
    else:
        dist.init_process_group("gloo")
    return Dist(rank, world, local, owned=True)


def default_device(d: Dist) -> torch.device:
    """cuda:LOCAL_RANK when there is a GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def sample_path(sample_dir: str, index: int, ext: str) -> str:
    return os.path.join(sample_dir, f"{index:06d}.{ext}")


def finished_indices(sample_dir: str, ext: str) -> set[int]:
    """Indices whose final file exists (temp files are hidden names and never match)."""
    if not os.path.isdir(sample_dir):
        return set()
    done = set()
    for name in os.listdir(sample_dir):
        m = _SAMPLE_FILE.match(name)
        if m and m.group(2) == ext:
            done.add(int(m.group(1)))
    return done


def remove_stale_temp_files(sample_dir: str) -> None:
    """Temp files left by a killed run (rank 0, before any rank writes)."""
    for name in os.listdir(sample_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(sample_dir, name))


def npz_path(sample_dir) -> str:
    return os.path.normpath(os.fspath(sample_dir)) + ".npz"


def check_sample_dir(sample_dir, resume: bool, name: str = "sample_dir") -> str:
    """Normalised path; raises a clear error (naming `name`) unless the run may write there.

    Without resume an existing non-empty folder (or an existing .npz) is refused: nothing is
    ever silently overwritten.
    """
    path = os.path.normpath(os.fspath(sample_dir))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{name} {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{name} {path} is not writable")
        if os.listdir(path) and not resume:
            raise FileExistsError(f"{name} {path} is not empty: pass --resume (resume=True) to continue "
                                  f"that run, or choose a new directory")
        held = lock_holder(path)  # checked again when the lock is taken; here to fail before loading models
        if held:
            raise FolderLocked(f"{name} {held}")
    else:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise NotADirectoryError(f"{name} {path} cannot be created: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"{name} {path} cannot be created: {parent} is not writable")
    npz = npz_path(path)
    if os.path.isdir(npz):
        raise IsADirectoryError(f"{name}: {npz} (where the .npz goes) is a directory")
    if os.path.exists(npz) and not resume:
        raise FileExistsError(f"{name}: {npz} already exists: remove it, or pass --resume (resume=True)")
    return path


def make_npz(sample_dir, num: int, resize: int | None = None, path: str | None = None) -> str:
    """Stack files 0..num-1 into `{sample_dir}.npz` (key arr_0) and return its path.

    PNGs give uint8 (num, H, W, 3), the ADM evaluator's format; `resize` resizes each image to
    resize x resize with PIL BILINEAR after convert('RGB'), as the DoG scripts do (299).
    .npy latents give float32 (num, C, L, L). Extra files beyond num are ignored. Files with
    checksums in the folder's manifest.json must match them (sample_to_dir records them).
    """
    sample_dir = os.path.normpath(os.fspath(sample_dir))
    manifest = folder_manifest(sample_dir)
    known = known_checksums(sample_dir, manifest.get("files"))
    out, _ = read_samples(sample_dir, num, resize, known, strict=False)
    path = path or npz_path(sample_dir)
    write_atomic(path, lambda f: np.savez(f, arr_0=out))  # a file object: savez appends no suffix
    return path


def read_samples(sample_dir: str, num: int, resize: int | None, known: dict, strict: bool,
                 stack: bool = True) -> tuple[np.ndarray | None, dict]:
    """(files 0..num-1 stacked (None unless stack), {name: checksum}); each file is read once and
    checked against `known` (sample_dir.check_bytes): a damaged or changed file is an error."""
    ext = "png" if os.path.exists(sample_path(sample_dir, 0, "png")) else "npy"
    if ext == "npy" and resize:
        raise ValueError("resize applies to PNG samples, not to .npy latents")
    out, checksums = None, {}
    for i in range(num):
        f = sample_path(sample_dir, i, ext)
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f} is missing: cannot build the .npz from {num} samples")
        with open(f, "rb") as fh:
            data = fh.read()
        name = os.path.basename(f)
        if stack and not strict and name not in known:  # nothing to compare: decoding it below is the check
            checksums[name] = file_checksum(data)
        else:
            checksums[name], why = check_bytes(name, data, known, strict)
            if why is not None:  # e.g. a disk filled up while it was written, or a file replaced since
                raise ValueError(f"{f} {why}: rerun with --resume (resume=True) to draw it again")
        if not stack:
            continue
        try:
            arr = read_sample_bytes(data, name, resize)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{f}: cannot read this sample ({err}); rerun with --resume (resume=True) to draw it "
                             f"again") from err
        if out is None:  # preallocate: a list plus np.stack would hold the data twice
            out = np.empty((num, *arr.shape), dtype=arr.dtype)
        if arr.shape != out.shape[1:]:
            raise ValueError(f"{f} holds shape {arr.shape}, sample 0 {out.shape[1:]}: the folder mixes runs")
        out[i] = arr
    return out, checksums


# ----------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------

@dataclass
class SampleDirResult:
    sample_dir: str
    npz: str | None
    num_samples: int
    num_written: int      # samples written by this run, all ranks together
    num_skipped: int      # samples already present (resume)
    seconds: float        # sampling wall time, .npz excluded
    world_size: int

    @property
    def images_per_second(self) -> float:
        return self.num_written / self.seconds if self.seconds > 0 else float("nan")


class SamplingDiverged(RuntimeError):
    """A batch came out NaN/inf; files already written are kept."""


def check_classes(finetuned, info: dict, num_classes: int) -> None:
    """Labels are drawn from [0, num_classes): checked here, before the folder and manifest exist, not by
    sample() halfway through. They must stay inside the label table and off its null row (a DiT built
    with label dropout has one, at its num_classes): drawn as a class, it gives unconditional samples."""
    rows = info["table_rows"]
    if rows is not None and num_classes > rows:
        raise ValueError(f"num_classes {num_classes} (dgfast sample: --num-classes) is more than the finetuned "
                         f"model's label table holds ({rows} rows): labels are drawn from [0, num_classes)")
    own = getattr(getattr(finetuned, "y_embedder", None), "num_classes", None)  # dgfast and upstream DiT
    if rows is not None and isinstance(own, int) and rows == own + 1 and num_classes > own:
        raise ValueError(f"num_classes {num_classes} (dgfast sample: --num-classes) reaches the finetuned model's "
                         f"null row (label {own} of its {rows}-row table): 1 sample in {num_classes} would be drawn "
                         f"unconditionally; the model has {own} classes")


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be in [{low}, {high if high is not None else 'inf'}), got {value}")
    return int(value)


@torch.no_grad()
def sample_to_dir(finetuned, pretrained, sample_dir, *, num_samples: int, batch_size: int, num_classes: int,
                  global_seed: int = 0, seed_mode: str = "per-sample", vae=None, resume: bool = False,
                  guidance_scale: float = 1.5, steps="250", guidance_channels=3, null_label: int = 1000,
                  sampler: str = "ddpm", eta: float = 0.0, backend: str = "auto", paired=True,
                  npz: bool = True, npz_resize: int | None = None, progress: bool = True,
                  run_config: dict | None = None, exact: bool = False, compile=False, scheduler: str | None = None,
                  guidance_interval=(0.0, 1.0), pretrained_every: int = 1) -> SampleDirResult:
    """Sample `num_samples` images (indices 0..num_samples-1) into `sample_dir`; see the module doc.

    finetuned / pretrained / guidance_scale / steps / guidance_channels / null_label / sampler /
    eta / backend / paired / exact / compile / guidance_interval / pretrained_every are passed to
    `dgfast.sample` (guidance_scale 1: `pretrained` unused). scheduler: a name from
    dgfast.samplers.NAMED_SCHEDULERS (a fresh scheduler per batch; steps an int; per-sample seeds only).
    Models must be in eval mode on this rank's device. batch_size is per process.
    vae: None saves latents as `.npy` (float32 (C, L, L)) and the .npz holds float32 (N, C, L, L);
    otherwise an object with `decode(latents).sample` (diffusers AutoencoderKL), decoded as
    `vae.decode(x / 0.18215).sample` and saved as PNG. resume=True skips finished samples.
    run_config: extra JSON-able settings stored in manifest.json and checked on resume.
    Call it on every rank under torchrun; rank 0 writes manifest.json and the .npz.
    Guards (dgfast/sample_dir.py, README "Reliability"): rank 0 holds the folder's lock for the whole
    run (FolderLocked if another live process does); every file is checksummed, and damaged finished
    files are drawn again on resume; a batch whose samples diverge (NaN/inf or |x| > 1e4, in the loop
    or after the VAE) raises SamplingDiverged naming them, the files written so far kept; a batch that
    cannot fit in free memory is refused before anything is written.
    """
    from dgfast.api import check_bool, model_device, model_info

    resume, npz, progress = check_bool(resume, "resume"), check_bool(npz, "npz"), check_bool(progress, "progress")
    # before the folder exists, not in the first batch
    sched_settings = _check_sampler_options(sampler, eta, scheduler, steps, seed_mode, guidance_interval,
                                            pretrained_every)
    eta = float(eta)
    num_samples, batch_size, num_classes, global_seed = _check_counts(num_samples, batch_size, num_classes,
                                                                      global_seed)
    cmode = _check_run_options(seed_mode, guidance_scale, exact, compile, npz_resize, vae)
    sample_dir = check_sample_dir(sample_dir, resume)
    ext = "npy" if vae is None else "png"
    info = model_info(finetuned)
    check_classes(finetuned, info, num_classes)
    device = model_device(finetuned) or torch.device("cpu")
    check_batch_memory(finetuned, vae, batch_size, info["input_size"], device,
                       "batch_size (dgfast sample: --per-proc-batch-size)")
    settings = dict(num_classes=num_classes, global_seed=global_seed, seed_mode=seed_mode,
                    guidance_scale=float(guidance_scale), steps=str(steps), guidance_channels=guidance_channels,
                    null_label=null_label, sampler=sampler, eta=float(eta), output=ext,
                    backend=_resolved_backend(backend, device), run=run_config, exact=bool(exact), compile=cmode,
                    **sched_settings)
    d = init_distributed()
    if seed_mode == "reference":  # the script's stream depends on both
        settings.update(world_size=d.world_size, batch_size=batch_size)
    if resume:
        check_resume(sample_dir, settings)

    if seed_mode == "reference" and (info["in_channels"] is None or info["input_size"] is None):
        raise ValueError("seed_mode='reference' needs a model whose in_channels and input_size are known")
    batches = (_per_sample_batches if seed_mode == "per-sample" else _reference_batches)(num_samples, batch_size, d)
    lock, log = FolderLock(sample_dir), ChecksumLog(sample_dir)
    try:
        d.barrier()  # every rank has checked the folder (check_sample_dir, check_resume) before rank 0 changes it
        _on_main(d, lambda: _open_folder(sample_dir, lock, settings, dict(
            num_samples=num_samples, world_size=d.world_size, batch_size=batch_size, resume=bool(resume))))
        done = _finished_and_verified(d, sample_dir, ext, batches, num_samples)
        todo = [not all(i in done for i in idx if i < num_samples) for idx in batches]
        pending = num_samples - len(done & set(range(num_samples)))

        call = dict(guidance_scale=guidance_scale, steps=steps, guidance_channels=guidance_channels,
                    null_label=null_label, sampler=sampler, eta=eta, backend=backend, paired=paired,
                    exact=exact, compile=compile, scheduler=scheduler, guidance_interval=tuple(guidance_interval),
                    pretrained_every=pretrained_every)
        draw = _block_sampler(finetuned, pretrained, call, seed_mode=seed_mode, global_seed=global_seed,
                              num_classes=num_classes, info=info, device=device, d=d)
        seconds = _draw_and_write(draw, zip(batches, todo), pending, num_samples, sample_dir, vae, log, d, progress)
        path = _on_main(d, lambda: _close_folder(sample_dir, num_samples, npz, npz_resize))
    finally:
        log.close()
        lock.release()
    if d.owned:
        dist.destroy_process_group()
    return SampleDirResult(sample_dir, path if npz else None, num_samples, pending, num_samples - pending,
                           seconds, d.world_size)


def _check_counts(num_samples, batch_size, num_classes, global_seed) -> tuple[int, int, int, int]:
    return (_check_int(num_samples, "num_samples", 1, MAX_INDEX), _check_int(batch_size, "batch_size", 1),
            _check_int(num_classes, "num_classes", 1), _check_int(global_seed, "global_seed", 0, 1 << 31))


def _resolved_backend(backend: str, device) -> str:
    """The step's implementation as resolved here ("auto" differs by device and DGFAST_BACKEND): backends
    round differently, so a resume with another one would rewrite finished samples with other bytes."""
    from dgfast.ops import resolve_backend
    return resolve_backend(backend, torch.empty(0, device=device))


def _check_sampler_options(sampler: str, eta, scheduler, steps, seed_mode: str, guidance_interval,
                           pretrained_every) -> dict:
    """sample_to_dir's sampler options, checked before any folder exists; returns the settings that
    differ from the defaults (recorded for --resume only then, so that folders from before these
    options existed resume as they were: with the defaults)."""
    from dgfast import samplers
    from dgfast.api import check_eta
    if scheduler is not None:
        if sampler != "ddpm":
            raise ValueError(f"pass either sampler= or scheduler=, not both (sampler={sampler!r})")
        if seed_mode == "reference":
            raise ValueError(f"scheduler={scheduler!r} needs seed_mode='per-sample' (seed_mode='reference' replays "
                             f"sample_ddp.py's random stream, which has no diffusers schedulers)")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise ValueError(f"steps must be an int with scheduler={scheduler!r}, got {steps!r}")
        check_eta(eta, sampler, samplers.named_scheduler(scheduler))  # unknown name / no diffusers: said here
    else:
        check_eta(eta, sampler)
    interval = samplers.check_controls(guidance_interval, 0.0, "dog", pretrained_every)
    given = dict(scheduler=scheduler, guidance_interval=list(interval), pretrained_every=pretrained_every)
    defaults = dict(scheduler=None, guidance_interval=[0.0, 1.0], pretrained_every=1)
    return {k: v for k, v in given.items() if v != defaults[k]}


def _check_run_options(seed_mode: str, guidance_scale, exact: bool, compile, npz_resize, vae) -> str | None:
    """sample_to_dir's option checks that need no folder and no model (before any folder exists);
    returns the torch.compile mode (None without compile)."""
    if seed_mode not in SEED_MODES:
        raise ValueError(f"seed_mode must be one of {SEED_MODES}, got {seed_mode!r}")
    from dgfast.convert import compile_mode
    cmode = compile_mode(compile)
    if exact and cmode:
        raise ValueError("exact=True runs the models as given; it does not combine with compile=")
    if seed_mode == "reference" and guidance_scale < 1:
        raise ValueError(f"seed_mode='reference' reproduces sample_ddp.py, which needs guidance_scale >= 1, "
                         f"got {guidance_scale}")
    if npz_resize is not None:
        _check_int(npz_resize, "npz_resize", 1)
        if vae is None:
            raise ValueError("npz_resize needs a vae: latents (.npy) are not resized")
    return cmode


def _draw_and_write(draw, blocks, pending: int, num_samples: int, sample_dir: str, vae, log: ChecksumLog, d: Dist,
                    progress: bool) -> float:
    """Draw each (indices, needed) block and write its files, with a progress bar on rank 0; returns the
    seconds until every rank has finished (the barrier included)."""
    from tqdm.auto import tqdm
    bar = tqdm(total=pending, unit="img", desc="dgfast sample", disable=not (progress and d.is_main),
               dynamic_ncols=True)
    start = time.perf_counter()
    for idx, needed in blocks:
        block = draw(idx, needed)
        if block is None:  # finished
            continue
        x, labels, diverged = block
        batch = _Batch(idx, labels, num_samples, sample_dir)
        if diverged is not None:
            batch.stop_if_diverged(diverged.rows, f"{diverged.kind} {diverged.where()}")
        written = _write_batch(x, batch, vae, log)
        bar.update(min(written * d.world_size, bar.total - bar.n))
    log.close()
    d.barrier()
    seconds = time.perf_counter() - start
    bar.close()
    return seconds


def _block_sampler(finetuned, pretrained, call: dict, *, seed_mode: str, global_seed: int, num_classes: int,
                   info: dict, device, d: Dist):
    """draw(indices, needed) -> (samples, labels, Divergence or None) for one block, or None for a
    finished one (in reference mode after replaying its random draws). Reference mode seeds the
    default generator here, right before the first block, as the scripts do."""
    from dgfast.api import sample

    def per_sample(idx, needed):
        if not needed:
            return None
        seeds = [sample_seed(global_seed, i) for i in idx]
        y = torch.tensor([sample_label(global_seed, i, num_classes) for i in idx], device=device)
        x, diverged = _watched(lambda: sample(finetuned, pretrained, None, y, noise="per-sample", seeds=seeds, **call))
        return x, y.tolist(), diverged

    if seed_mode == "per-sample":
        return per_sample
    torch.manual_seed(global_seed * d.world_size + d.rank)
    num_steps = _num_steps(call["steps"])

    def reference(idx, needed):
        C, L = info["in_channels"], info["input_size"]
        z = torch.randn(len(idx), C, L, L, device=device)
        y = torch.randint(0, num_classes, (len(idx),), device=device)
        if not needed:  # finished iteration: spend its step noise as sample() would have
            _replay_step_noise(z, guided=call["guidance_scale"] != 1, num_steps=num_steps)
            return None
        x, diverged = _watched(lambda: sample(finetuned, pretrained, z, y, noise="reference", **call))
        return x, y.tolist(), diverged
    return reference


def _on_main(d: Dist, fn):
    """fn() on rank 0, then a barrier; an error there is raised on every rank (the others would wait
    at the next barrier forever). Returns rank 0's result on rank 0, None elsewhere."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 (re-raised below, after the other ranks know)
            error = err
    if d.world_size > 1:
        try:  # the exception itself, so that every rank reports the same error
            pickle.dumps(error)
        except Exception:  # noqa: BLE001
            error = RuntimeError(str(error))
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error
    return result


def _open_folder(sample_dir: str, lock: FolderLock, settings: dict, run: dict) -> None:
    """Rank 0, before any rank writes: create the folder, take its lock (before deleting anything: the
    temp files may be another live run's), clear a killed run's temp files, write manifest.json."""
    os.makedirs(sample_dir, exist_ok=True)
    lock.acquire()
    if lock.note:
        print(f"dgfast sample: {lock.note}", file=sys.stderr)
    remove_stale_temp_files(sample_dir)
    write_manifest(sample_dir, settings, run)


def _finished_and_verified(d: Dist, sample_dir: str, ext: str, batches, num_samples: int) -> set[int]:
    """The finished indices, once every rank has checked the finished files of its own blocks against
    their checksums and deleted the damaged ones (which are then drawn again, with a message)."""
    manifest = folder_manifest(sample_dir)
    known, strict = known_checksums(sample_dir, manifest.get("files")), "files" in manifest
    done = finished_indices(sample_dir, ext)
    mine = sorted({i for idx in batches for i in idx if i < num_samples} & done)
    bad = redraw_damaged(sample_dir, [os.path.basename(sample_path(sample_dir, i, ext)) for i in mine], known, strict)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"dgfast sample: drawing {len(bad)} damaged sample file(s) again: {shown}", file=sys.stderr)
    d.barrier()
    done = finished_indices(sample_dir, ext)  # every rank lists the same folder, before any rank writes
    d.barrier()
    return done


def _close_folder(sample_dir: str, num_samples: int, npz: bool, resize: int | None) -> str | None:
    """Rank 0, after every rank finished: check every file against its checksum, write the .npz (if
    asked), store the checksums in manifest.json, remove the logs and divergence records."""
    manifest = folder_manifest(sample_dir)
    known = known_checksums(sample_dir, manifest.get("files"))
    out, checksums = read_samples(sample_dir, num_samples, resize, known, strict="files" in manifest, stack=npz)
    path = None
    if npz:
        path = npz_path(sample_dir)
        write_atomic(path, lambda f: np.savez(f, arr_0=out))  # a file object: savez appends no suffix
    record_checksums(sample_dir, checksums)
    remove_checksum_logs(sample_dir)
    remove_divergence_records(sample_dir)
    return path


def _per_sample_batches(num_samples: int, batch_size: int, d: Dist) -> list[list[int]]:
    """Whole blocks [k*b, (k+1)*b), blocks k = rank, rank+W, ...; the last block is computed in
    full too (indices >= num_samples are not written) so every sample always sees batch size b."""
    num_blocks = math.ceil(num_samples / batch_size)
    return [list(range(k * batch_size, (k + 1) * batch_size)) for k in range(d.rank, num_blocks, d.world_size)]


def _reference_batches(num_samples: int, batch_size: int, d: Dist) -> list[list[int]]:
    """sample_ddp.py: total rounded up to the global batch; index = i*world + rank + offset."""
    global_batch = batch_size * d.world_size
    iterations = math.ceil(num_samples / global_batch)
    return [[it * global_batch + i * d.world_size + d.rank for i in range(batch_size)] for it in range(iterations)]


def _num_steps(steps) -> int:
    from dgfast.schedule import Schedule
    return Schedule.from_steps(steps).num_steps


def _replay_step_noise(z: torch.Tensor, guided: bool, num_steps: int) -> None:
    """The default-generator draws of one reference-mode sample() call: one randn per step over
    the batch the upstream loop holds (2n when guided). Same shapes, so the same stream."""
    rows = 2 * len(z) if guided else len(z)
    for _ in range(num_steps):
        torch.randn((rows, *z.shape[1:]), device=z.device, dtype=z.dtype)


def _watched(run):
    """(run()'s samples, the Divergence of its sampling loop or None), the divergence collected rather
    than warned about: the caller decides (padding rows past num_samples may diverge harmlessly)."""
    with collect() as found:
        x = run()
    return x, (found[0] if found else None)


@dataclass
class _Batch:
    """One computed block: its sample indices, labels, and where its files go."""
    indices: list
    labels: list
    num_samples: int
    sample_dir: str

    def stop_if_diverged(self, rows, what: str) -> None:
        """Raise SamplingDiverged naming the samples (rows of the batch) that are written (< num_samples),
        recording them in the folder; when a previous run recorded the same ones, say it will recur."""
        rows = [r for r in rows if self.indices[r] < self.num_samples]
        if not rows:
            return  # only padding rows, which are never written
        idx, labels = [self.indices[r] for r in rows], [self.labels[r] for r in rows]
        again = record_divergence(self.sample_dir, idx, labels, what,
                                  lambda path, data: write_atomic(path, lambda f: f.write(data)))
        plural = "s" if len(idx) > 1 else ""
        message = (f"sample{plural} {_spans(idx)} (label{plural} {_spans(labels, ranges=False)}) diverged: {what}; "
                   f"the samples written so far are kept")
        if again:
            message += (f". Samples {_spans(again)} diverged in an earlier run of this folder too: with these settings "
                        f"they always will, so --resume cannot finish the folder; check the checkpoints, the guidance "
                        f"scale and the backend (per-sample seeds: another --global-seed draws other samples)")
        raise SamplingDiverged(message)


def _spans(values, ranges: bool = True, show: int = 10) -> str:
    """'3, 7..9, 12' (runs of consecutive values as ranges), at most `show` items."""
    values, parts, k = list(values), [], 0
    while k < len(values):
        j = k
        while ranges and j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[k]) if j == k else f"{values[k]}..{values[j]}")
        k = j + 1
    return ", ".join(parts[:show]) + (f", ... ({len(values)} in all)" if len(parts) > show else "")


def _write_batch(x: torch.Tensor, batch: _Batch, vae, log: ChecksumLog) -> int:
    """Decode (whole batch, so its numerics never depend on num_samples) and write indices < N, each
    file's checksum logged before the file is renamed into place. Latents and decoded images are both
    checked: NaN/inf in a row that would be written stops the run (nothing of the batch is written)."""
    keep = [r for r, i in enumerate(batch.indices) if i < batch.num_samples]
    batch.stop_if_diverged([r for r in keep if not torch.isfinite(x[r]).all()], "NaN/inf in the samples")
    if vae is None:
        arrays, ext, save = x.float().cpu().numpy(), "npy", np.save
    else:
        images = vae.decode(x / LATENT_SCALE).sample
        bad = (~torch.isfinite(images.reshape(len(images), -1))).any(dim=1).tolist()
        batch.stop_if_diverged([r for r in keep if bad[r]], "the VAE decoded them to NaN/inf (their latents were "
                                                              "finite): check the VAE (e.g. fp16 overflow)")
        arrays, ext, save = to_uint8(images).numpy(), "png", _save_png
    for r in keep:
        buffer = io.BytesIO()
        save(buffer, arrays[r])
        data = buffer.getvalue()
        path = sample_path(batch.sample_dir, batch.indices[r], ext)
        log.record(os.path.basename(path), data)
        write_atomic(path, lambda f: f.write(data))
    return len(keep)


def _save_png(f, arr: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(arr).save(f, format="PNG")
