"""The `dgfast` command line: `dgfast COMMAND ...` or `python -m dgfast COMMAND ...`.

Commands live in COMMANDS (name -> Command); to add one, write its `add_arguments(parser)` and
`run(args) -> exit code` and add an entry. A command raises UsageError for bad arguments: main()
prints it as `dgfast COMMAND: error: ...` and exits with 2, as argparse does.

`dgfast sample` takes the flags of DiT's sample_ddp.py (plus DoG's) and runs under torchrun:
    torchrun --nproc_per_node=8 -m dgfast sample --model DiT-XL/2 --ckpt ft.pt \
        --pretrained-ckpt DiT-XL-2-256x256.pt --vae ./sd-vae-ft-ema --num-fid-samples 50000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from dgfast.samplers import NAMED_SCHEDULERS


class UsageError(Exception):
    """A bad argument; the message names the flag."""


@dataclass
class Command:
    help: str                                             # one line, in `dgfast --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]              # returns the exit code
    description: str | None = None                        # `dgfast COMMAND --help` (default: help)


# ----------------------------------------------------------------------------------------------
# dgfast sample: arguments
# ----------------------------------------------------------------------------------------------

SAMPLE_DESCRIPTION = """\
Sample a folder of numbered images (000000.png, ...) and {sample-dir}.npz (arr_0, uint8 NHWC)
for FID with the ADM evaluator, guided by Domain Guidance: the pre-trained model
(--pretrained-ckpt, null label --null-label) guides the fine-tuned one (--ckpt).
--cfg-scale 1 samples the fine-tuned model alone; --cfg-scale > 1 without --pretrained-ckpt is
DiT's classic CFG (the fine-tuned model's own null row, label --num-classes).
Single process, or torchrun --nproc_per_node=N -m dgfast sample ... (NCCL on CUDA, gloo on CPU).
Nothing is downloaded: checkpoints and the VAE are local files."""


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p.add_argument_group("models"))
    _add_guidance_arguments(p.add_argument_group("guidance and sampler"))
    _add_output_arguments(p.add_argument_group("output"))


def _add_model_arguments(g) -> None:
    # each pair below sets one thing two ways: both given would silently keep one, so argparse refuses
    one = g.add_mutually_exclusive_group()
    one.add_argument("--model", default="DiT-XL/2", help="fine-tuned DiT architecture (a DiT_models name)")
    one.add_argument("--model-config", metavar="JSON",
                     help="custom DiT architecture instead of --model: inline JSON or a .json file of DiT "
                          "keyword arguments, e.g. '{\"depth\": 2, \"hidden_size\": 64, \"patch_size\": 2, "
                          "\"num_heads\": 2}'")
    g.add_argument("--ckpt", help="fine-tuned checkpoint (.pt from DiT's train.py, 'ema' taken if present, "
                                  "or .safetensors); required")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--pretrained-ckpt", dest="pretrained_ckpt",
                     help="pre-trained (guiding) checkpoint, e.g. DiT-XL-2-256x256.pt; needed for DoG")
    one.add_argument("--uncond-ckpt", dest="pretrained_ckpt", help="the DoG scripts' name for --pretrained-ckpt")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--pretrained-model", dest="pretrained_model",
                     help="pre-trained architecture (default: the fine-tuned one)")
    one.add_argument("--uncond-model", dest="pretrained_model", help="the DoG scripts' name for --pretrained-model")
    g.add_argument("--image-size", type=int, default=256, help="image size (256 or 512); latents are image-size/8")
    g.add_argument("--num-classes", type=int, default=1000,
                   help="classes of the fine-tuned model; its label table must have one more row (the null row)")
    g.add_argument("--no-null-row", action="store_true",
                   help="the fine-tuned label table has no null row (trained without label dropout, e.g. DogFit): "
                        "it then has exactly --num-classes rows, and labels are drawn from all of them")
    g.add_argument("--pretrained-num-classes", type=int, default=None, metavar="N",
                   help="classes of the pre-trained model (default: its label table's rows minus the null "
                        "row, 1000 for an ImageNet DiT)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load .pt checkpoints with a full pickle load (weights_only=False) if the safe load "
                        "refuses them: this runs any code the file holds, so only for files you trust")
    g.add_argument("--vae", help="local diffusers AutoencoderKL directory (saved with save_pretrained), or "
                                 "'none' to save latents as .npy (then the .npz holds float32 (N, 4, L, L))")


def _add_guidance_arguments(g) -> None:
    g.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale w (1: no guidance)")
    g.add_argument("--num-sampling-steps", default="250", help="sampling steps (respacing, e.g. 250 or ddim50)")
    g.add_argument("--guidance-channels", default="3",
                   help="eps channels guided: 3 reproduces DiT/DoG (their 3-channel quirk), 'all' guides all")
    g.add_argument("--null-label", type=int, default=None,
                   help="label of the guiding branch (default: the pre-trained model's null row, i.e. its "
                        "number of classes, 1000 for an ImageNet DiT; without --pretrained-ckpt, --num-classes)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    one.add_argument("--scheduler", choices=list(NAMED_SCHEDULERS), default=None,
                     help="a diffusers scheduler on DiT's schedule instead of --sampler (needs diffusers; "
                          "--num-sampling-steps an int). dpmpp-2m-sde-karras with --num-sampling-steps 17 "
                          "--guidance-interval 0.4 1 --pretrained-every 2: 1/21 of DDPM-250's forwards at about "
                          "its FD on the embedded pair (bench/RESULTS.md)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("START", "STOP"),
                   help="guide only steps int(START*N) <= i < int(STOP*N) of N (step 0 the noisiest); the "
                        "pre-trained model does not run on the others (default: all steps)")
    g.add_argument("--pretrained-every", type=int, default=1, metavar="K",
                   help="run the pre-trained model on every K-th guided step, reusing its output in between "
                        "(changes the samples; default 1)")
    g.add_argument("--backend", choices=["auto", "triton", "cpp", "torch"], default="auto",
                   help="fused-op implementation")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on CUDA, as DiT's sample_ddp.py (default on)")
    g.add_argument("--exact", action="store_true",
                   help="run the checkpoints in upstream DiT's own module (dgfast.reference.ReferenceDiT), each "
                        "model its own forward: the scripts' bits (with --seed-mode reference), at their speed")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the paired forward (MODE: default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs; bare --compile: default)")


def _add_output_arguments(g) -> None:
    g.add_argument("--sample-dir", default="samples", help="output folder; the .npz goes to {sample-dir}.npz")
    g.add_argument("--num-fid-samples", type=int, default=50_000, help="number of samples (indices 0..N-1)")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="batch size of each process")
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--seed-mode", choices=["per-sample", "reference"], default="per-sample",
                   help="per-sample: sample i depends only on (global seed, i), for any batch or world size; "
                        "reference: DiT sample_ddp.py's random stream (depends on world and batch size)")
    g.add_argument("--resume", action="store_true", help="continue a run in --sample-dir, skipping finished samples")
    g.add_argument("--npz-resize", type=int, default=None, metavar="SIZE",
                   help="resize images in the .npz to SIZE x SIZE (PIL bilinear), e.g. 299 as the DoG scripts")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on rank 0")
    g.add_argument("--verbose", action="store_true", help="print the setup, and tracebacks on errors")


# ----------------------------------------------------------------------------------------------
# dgfast sample: validation (no file is written before all of it passes)
# ----------------------------------------------------------------------------------------------

def check_sample_args(args) -> None:
    from dgfast.distributed import MAX_INDEX
    from dgfast.models import DiT_models
    from dgfast.schedule import Schedule

    if args.num_fid_samples <= 0 or args.num_fid_samples >= MAX_INDEX:
        raise UsageError(f"--num-fid-samples must be in [1, {MAX_INDEX}), got {args.num_fid_samples}")
    if args.per_proc_batch_size <= 0:
        raise UsageError(f"--per-proc-batch-size must be >= 1, got {args.per_proc_batch_size}")
    if args.image_size <= 0 or args.image_size % 8:
        raise UsageError(f"--image-size must be a positive multiple of 8 (the VAE's factor), got {args.image_size}")
    if args.num_classes <= 0:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.pretrained_num_classes is not None and args.pretrained_num_classes <= 0:
        raise UsageError(f"--pretrained-num-classes must be >= 1, got {args.pretrained_num_classes}")
    if not 0 <= args.global_seed < 2 ** 31:
        raise UsageError(f"--global-seed must be in [0, 2**31), got {args.global_seed}")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise UsageError(f"--cfg-scale must be finite and >= 0, got {args.cfg_scale}")
    if args.seed_mode == "reference" and args.cfg_scale < 1:
        raise UsageError(f"--seed-mode reference reproduces sample_ddp.py, which needs --cfg-scale >= 1, "
                         f"got {args.cfg_scale}")
    if not math.isfinite(args.eta) or args.eta < 0:
        raise UsageError(f"--eta must be finite and >= 0, got {args.eta}")
    if args.sampler == "ddim" and args.eta > 1:
        raise UsageError(f"--eta must be in [0, 1] with --sampler ddim (above 1 DDIM's step is NaN), got {args.eta}")
    if args.sampler != "ddim" and args.eta != 0:
        used = f"--scheduler {args.scheduler}" if args.scheduler else f"--sampler {args.sampler}"
        raise UsageError(f"--eta {args.eta} is DDIM's: {used} would ignore it; pass --sampler ddim "
                         f"or leave --eta out")
    try:
        Schedule.from_steps(int(args.num_sampling_steps) if args.num_sampling_steps.isdigit()
                            else args.num_sampling_steps)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--num-sampling-steps {args.num_sampling_steps!r}: {err}") from None
    check_guidance_controls(args)
    args.guidance_channels = parse_guidance_channels(args.guidance_channels)
    if args.null_label is not None and args.null_label < 0:
        raise UsageError(f"--null-label must be >= 0, got {args.null_label}")
    if args.compile is not None:
        from dgfast.convert import compile_mode
        try:
            compile_mode(args.compile)
        except ValueError:
            raise UsageError(f"--compile {args.compile!r}: choose a torch.compile mode, one of "
                             f"default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs") from None
        if args.exact:
            raise UsageError("--exact runs upstream's module as it is; it does not combine with --compile")
    if args.npz_resize is not None and args.npz_resize <= 0:
        raise UsageError(f"--npz-resize must be >= 1, got {args.npz_resize}")
    if args.model_config is not None:
        args.model_config = parse_model_config(args.model_config)
    elif args.model not in DiT_models:
        raise UsageError(f"--model {args.model!r} is not a DiT model; choose one of {', '.join(DiT_models)}")
    if args.pretrained_model is not None and args.pretrained_model not in DiT_models:
        raise UsageError(f"--pretrained-model {args.pretrained_model!r} is not a DiT model; "
                         f"choose one of {', '.join(DiT_models)}")
    if not args.ckpt:
        raise UsageError("--ckpt is required: dgfast does not download checkpoints")
    check_file(args.ckpt, "--ckpt")
    if args.pretrained_ckpt:
        check_file(args.pretrained_ckpt, "--pretrained-ckpt")
    elif args.pretrained_model is not None:
        raise UsageError("--pretrained-model needs --pretrained-ckpt")
    check_vae_arg(args)
    from dgfast.distributed import check_sample_dir
    try:
        check_sample_dir(args.sample_dir, args.resume, name="--sample-dir")
    except OSError as err:
        raise UsageError(str(err)) from None


def check_guidance_controls(args) -> None:
    """--scheduler, --guidance-interval and --pretrained-every (args.guidance_interval becomes a tuple)."""
    from dgfast import samplers
    if args.scheduler is not None:
        if not args.num_sampling_steps.isdigit():
            raise UsageError(f"--num-sampling-steps must be an int with --scheduler (diffusers' set_timesteps), "
                             f"got {args.num_sampling_steps!r}")
        if args.seed_mode == "reference":
            raise UsageError("--scheduler needs --seed-mode per-sample (reference replays sample_ddp.py's random "
                             "stream, which has no diffusers schedulers)")
        try:
            samplers.named_scheduler(args.scheduler)
        except ImportError:
            raise UsageError(f"--scheduler {args.scheduler} is a diffusers scheduler, and diffusers is not "
                             f"installed: pip install diffusers (or use --sampler ddpm/ddim)") from None
    if args.pretrained_every < 1:
        raise UsageError(f"--pretrained-every must be >= 1, got {args.pretrained_every}")
    interval = args.guidance_interval if args.guidance_interval is not None else [0.0, 1.0]
    try:
        args.guidance_interval = samplers.check_controls(interval, 0.0, "dog", args.pretrained_every)
    except ValueError:
        raise UsageError(f"--guidance-interval {interval[0]:g} {interval[1]:g}: need 0 <= START < 1 and "
                         f"START <= STOP <= 1 (fractions of the steps, step 0 the noisiest)") from None


def parse_guidance_channels(value: str):
    if value == "all":
        return "all"
    try:
        k = int(value)
    except ValueError:
        k = -1
    if k < 0:
        raise UsageError(f"--guidance-channels must be an int >= 0 or 'all', got {value!r}")
    return k


def parse_model_config(value: str) -> dict:
    """Inline JSON, or the path of a .json file: a file that exists is read; text that parses as JSON
    (an object or not) is inline; anything else is a missing file, unless it starts like an object."""
    text, source = value, "--model-config"
    if os.path.isfile(value):
        with open(value) as f:
            text, source = f.read(), f"--model-config {value}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        if source == "--model-config" and not value.lstrip().startswith("{"):
            check_file(value, "--model-config")  # neither JSON nor a file: say the file is missing
        raise UsageError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{source} must be a JSON object of DiT keyword arguments (e.g. {{\"depth\": 2}}), got "
                         f"a JSON {type(config).__name__}: {json.dumps(config)[:60]}")
    taken = {"input_size", "num_classes", "class_dropout_prob"} & set(config)
    if taken:
        raise UsageError(f"--model-config must not set {sorted(taken)}: they come from --image-size, "
                         f"--num-classes and the checkpoint")
    return config


def check_file(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")


def check_vae_arg(args) -> None:
    if args.vae is None:
        raise UsageError("--vae is required: a local AutoencoderKL directory (e.g. saved with "
                         "AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema').save_pretrained(DIR) on a "
                         "machine with network), or 'none' to save latents")
    if args.vae == "none":
        if args.npz_resize is not None:
            raise UsageError("--npz-resize needs a VAE: --vae none saves latents, which are not resized")
        return
    if not os.path.isdir(args.vae):
        hint = " (DiT's 'ema'/'mse' are hub names)" if args.vae in ("ema", "mse") else ""
        raise UsageError(f"--vae {args.vae}: no such local directory{hint}; dgfast does not download from the "
                         f"Hugging Face hub: pass a directory saved with AutoencoderKL.save_pretrained, or 'none'")
    if not os.path.isfile(os.path.join(args.vae, "config.json")):
        raise UsageError(f"--vae {args.vae}: no config.json there; expected a directory saved with "
                         f"AutoencoderKL.save_pretrained")


# ----------------------------------------------------------------------------------------------
# dgfast sample: models
# ----------------------------------------------------------------------------------------------

def arch_name(arch) -> str:
    return arch if isinstance(arch, str) else f"--model-config {json.dumps(arch)}"


def load_dit(flag: str, path: str, arch, image_size: int, num_classes: int | None, device, backend: str,
             *, classes_flag: str = "--num-classes", trusted: bool = False, null_row: bool | None = None):
    """DiT `arch` (a DiT_models name or a config dict) with the weights at `path`, strictly.

    null_row True: the label table must have num_classes+1 rows (trained with label dropout: the
    last row is the null row, which labels drawn from [0, num_classes) never reach); False:
    num_classes rows (DogFit, dropout 0); None: either (a guiding model, whose classes are not
    sampled). The dropout setting only decides the table size.
    num_classes None: the table's rows minus a null row (a guiding model needs one).
    classes_flag names the flag num_classes came from, for the error.
    """
    from dgfast.models import DiT, build_model

    state = read_checkpoint(flag, path, trusted)
    table = state.get("y_embedder.embedding_table.weight")
    file_rows = table.shape[0] if table is not None else None
    if num_classes is None:
        # rows - 1 (the last row taken as the null row), except that 1000 rows keep ImageNet's 1000
        # classes: a 1000-row table is an ImageNet DiT trained without label dropout (no null row),
        # which must stay an error below rather than guide with class 999 as its "null"
        num_classes = 1000 if file_rows is None or file_rows in (1000, 1001) or file_rows < 2 else file_rows - 1
    rows = file_rows if file_rows is not None else num_classes + 1
    if rows not in (num_classes, num_classes + 1):
        raise UsageError(f"{flag} {path} has a label table of {rows} rows; {classes_flag} {num_classes} needs "
                         f"{num_classes} or {num_classes + 1}")
    check_null_row(flag, path, rows, num_classes, classes_flag, null_row)
    kwargs = dict(input_size=image_size // 8, num_classes=num_classes,
                  class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0)
    try:
        model = build_model(arch, **kwargs) if isinstance(arch, str) else DiT(**arch, **kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build {arch_name(arch)}: {err}") from None
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise UsageError(f"{flag} {path} does not fit {arch_name(arch)} at --image-size {image_size}: {problems}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().set_backend(backend)


def check_null_row(flag: str, path: str, rows: int, num_classes: int, classes_flag: str, null_row) -> None:
    """A table of num_classes rows is ambiguous: num_classes classes and no null row, or one class
    fewer plus the null row, which would then be sampled as a class (1 sample in num_classes drawn
    unconditionally). The fine-tuned model's must be said: --no-null-row."""
    if null_row is True and rows == num_classes:
        raise UsageError(f"{flag} {path} has a label table of {rows} rows and {classes_flag} is {num_classes}: labels "
                         f"would be drawn from every row, the last one included, which is the null row of a model "
                         f"trained with label dropout (as DiT's train.py does), so 1 sample in {rows} would be "
                         f"unconditional. Pass {classes_flag} {rows - 1}, or --no-null-row if the model was trained "
                         f"without label dropout")
    if null_row is False and rows != num_classes:
        raise UsageError(f"{flag} {path} has a label table of {rows} rows; --no-null-row with {classes_flag} "
                         f"{num_classes} needs exactly {num_classes}")


def read_checkpoint(flag: str, path: str, trusted: bool) -> dict:
    """load_checkpoint, its errors (corrupt, truncated, refused pickle) as one line naming the flag."""
    from dgfast.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path, trusted=trusted)
    except (OSError, ValueError, RuntimeError) as err:  # CheckpointError is a ValueError
        msg = str(err).replace("trusted=True (dgfast sample: --trust-checkpoint)", "--trust-checkpoint")
        msg = msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg  # the path is named once, below
        raise UsageError(f"{flag} {path}: cannot load it: {msg}") from None


def state_dict_mismatch(expected: dict, got: dict, show: int = 3) -> str:
    """'' when the keys and shapes agree, else the first few differences in words."""
    out = [f"{k} is {tuple(got[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
           for k, v in expected.items() if k in got and got[k].shape != v.shape]
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing:
        out.append(f"missing {', '.join(missing[:show])}{' ...' if len(missing) > show else ''}")
    if extra:
        out.append(f"unexpected {', '.join(extra[:show])}{' ...' if len(extra) > show else ''}")
    return "; ".join(out[:show + 2])


def load_vae(path: str, device):
    if path == "none":
        return None
    from diffusers import AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"--vae {path}: cannot load an AutoencoderKL from it: {err}") from None
    return vae.to(device).eval()


def load_models(args, device):
    """(finetuned, pretrained or None, null_label) as the flags describe."""
    arch = args.model_config if args.model_config is not None else args.model
    ft = load_dit("--ckpt", args.ckpt, arch, args.image_size, args.num_classes, device, args.backend,
                  trusted=args.trust_checkpoint, null_row=not args.no_null_row)
    if args.guidance_channels != "all" and args.guidance_channels > ft.in_channels:
        raise UsageError(f"--guidance-channels {args.guidance_channels}: the model has {ft.in_channels} channels")
    if args.cfg_scale == 1:
        return ft, None, args.null_label if args.null_label is not None else 1000
    if args.pretrained_ckpt:
        pre_arch = args.pretrained_model or arch
        # any label set: the pre-trained model need not be an ImageNet DiT (e.g. the zoo pair)
        pre = load_dit("--pretrained-ckpt", args.pretrained_ckpt, pre_arch, args.image_size,
                       args.pretrained_num_classes, device, args.backend, classes_flag="--pretrained-num-classes",
                       trusted=args.trust_checkpoint)
        null = args.null_label if args.null_label is not None else pre.num_classes  # its null row
        owner = "--pretrained-ckpt"
    else:  # DiT's classic CFG: the fine-tuned model guides itself with its own null row
        pre = ft
        null, owner = (args.null_label if args.null_label is not None else args.num_classes), "--ckpt"
    if null >= pre.num_table_rows:
        raise UsageError(f"--null-label {null} is outside {owner}'s label table ({pre.num_table_rows} rows)"
                         + ("" if args.pretrained_ckpt else "; for Domain Guidance pass --pretrained-ckpt"))
    return ft, pre, null


# ----------------------------------------------------------------------------------------------
# dgfast sample: run
# ----------------------------------------------------------------------------------------------

def run_sample(args) -> int:
    from dgfast.distributed import default_device, init_distributed, sample_to_dir

    check_sample_args(args)
    d = init_distributed()
    try:
        device = default_device(d)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = args.tf32  # as sample_ddp.py; cudnn keeps its default
        ft, pre, null = load_models(args, device)
        if args.exact:  # upstream's module on the same tensors: the scripts' forward, op for op
            from dgfast.adapters import to_upstream
            up = {id(m): to_upstream(m) for m in (ft, pre) if m is not None}  # classic CFG: pre is ft
            ft, pre = up[id(ft)], None if pre is None else up[id(pre)]
        vae = load_vae(args.vae, device)
        say = print if d.is_main else (lambda *a, **k: None)
        mode = ("no guidance" if pre is None else "classic CFG" if pre is ft else "Domain Guidance")
        say(f"dgfast sample: {mode}, w={args.cfg_scale}, null label {null}, {args.seed_mode} seeds, "
            f"{d.world_size} process(es) on {device.type}", file=sys.stderr)
        if pre is not None and pre is not ft and args.null_label is None and args.pretrained_num_classes is None:
            say(f"dgfast sample: null label {null} is the last row of --pretrained-ckpt's label table, taken as "
                f"its null row (pass --pretrained-num-classes or --null-label if it has none)", file=sys.stderr)
        if args.verbose:
            say(f"dgfast sample: {dict((k, v) for k, v in vars(args).items() if k != 'run')}", file=sys.stderr)
        steps = int(args.num_sampling_steps) if args.num_sampling_steps.isdigit() else args.num_sampling_steps
        result = sample_to_dir(
            ft, pre, args.sample_dir, num_samples=args.num_fid_samples, batch_size=args.per_proc_batch_size,
            num_classes=args.num_classes, global_seed=args.global_seed, seed_mode=args.seed_mode, vae=vae,
            resume=args.resume, guidance_scale=args.cfg_scale, steps=steps,
            guidance_channels=args.guidance_channels, null_label=null, sampler=args.sampler, eta=args.eta,
            backend=args.backend, npz_resize=args.npz_resize, progress=args.progress,
            run_config=run_config(args, ft, pre), exact=args.exact, compile=args.compile or False,
            scheduler=args.scheduler, guidance_interval=args.guidance_interval, pretrained_every=args.pretrained_every)
        say(f"dgfast sample: {result.num_written} images in {result.seconds:.1f} s "
            f"({result.images_per_second:.2f} images/s, {result.world_size} process(es)), "
            f"{result.num_skipped} already present; {result.sample_dir}, {result.npz}")
    finally:
        if d.owned:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def run_config(args, ft=None, pre=None) -> dict:
    """What, besides sample_to_dir's own settings, decides the files (checked on --resume). The
    weights' full digests catch a checkpoint replaced or edited at the same path."""
    from dgfast.checkpoint import sampled_weights_digest, weights_digest
    cfg = dict(model=args.model if args.model_config is None else args.model_config, ckpt=real_path(args.ckpt),
               pretrained_ckpt=real_path(args.pretrained_ckpt), pretrained_model=args.pretrained_model,
               image_size=args.image_size, vae=args.vae if args.vae == "none" else real_path(args.vae))
    old = previous_run_config(args) or {}
    for key, model in (("ckpt", ft), ("pretrained", pre if pre is not ft else None)):
        if model is None:
            continue
        cfg[f"{key}_sha256"] = weights_digest(model)
        if f"{key}_weights" in old:  # a folder from before the full digest: compare what it recorded too
            cfg[f"{key}_weights"] = sampled_weights_digest(model)
    if old and any(f"{k}_weights" in old and f"{k}_sha256" not in old for k in ("ckpt", "pretrained")):
        print(f"dgfast sample: note: {args.sample_dir} was started by an older dgfast that recorded a digest of 64 "
              f"values per weight tensor; the weights are checked against that, and the full digest is recorded "
              f"from now on", file=sys.stderr)
    return cfg


def previous_run_config(args) -> dict | None:
    """The run settings recorded in --sample-dir's manifest.json when resuming, else None."""
    if not args.resume:
        return None
    from dgfast.manifest import read_settings
    run = (read_settings(args.sample_dir) or {}).get("run")
    return run if isinstance(run, dict) else None


def real_path(path: str | None) -> str | None:
    """One spelling per file, so that a resume from another directory or through a symlink matches."""
    return os.path.realpath(path) if path else path


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    # imported here, not at the top: the demo pulls in the zoo and the reference loop
    try:
        from dgfast.zoo import demo
    except ImportError as err:  # a checkout without the embedded models: say so when demo is run
        p.set_defaults(demo_missing=str(err))
        return
    demo.add_arguments(p)


def run_demo(args) -> int:
    if getattr(args, "demo_missing", None):
        raise UsageError(f"the embedded model pair is not installed ({args.demo_missing})")
    from dgfast.zoo import demo
    return demo.run(args)


COMMANDS: dict[str, Command] = {
    "sample": Command("sample a folder of images and an .npz for FID (DiT sample_ddp.py flags, torchrun-aware)",
                      add_sample_arguments, run_sample, SAMPLE_DESCRIPTION),
    "demo": Command("Domain Guidance on the embedded DiT pair: image grid, demo.json, throughput vs the "
                    "upstream loop", add_demo_arguments, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgfast", description="dgfast: fast Domain Guidance sampling for DiT.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv=None) -> int:
    from dgfast.distributed import SamplingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, OSError, ValueError, SamplingDiverged) as err:
        # OSError/ValueError: also raised by sample_to_dir's checks, e.g. a --resume with other settings;
        # SamplingDiverged: a NaN batch (the files written so far are kept)
        if getattr(args, "verbose", False):
            traceback.print_exc()
        rank = os.environ.get("RANK")
        where = f" [rank {rank}]" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"dgfast {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every finished sample is a complete file (written atomically)
        if os.environ.get("RANK", "0") == "0":
            hint = (f": finished samples are kept in {args.sample_dir}; run the same command with --resume "
                    f"to continue" if getattr(args, "sample_dir", None) else "")
            print(f"\ndgfast {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
