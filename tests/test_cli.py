"""`dgfast sample` (dgfast/cli.py) and `dgfast.sample_to_dir` (dgfast/distributed.py).

Tiny random DiTs (4x4 latents, 2 blocks of width 32) so that multi-process runs take seconds.

Bitwise comparisons: on CPU the GEMM and conv kernels round a row differently depending on the
batch size and on the row's position in the batch (MKL/oneDNN blocking). So
- "any batch size, any world size -> identical files" is tested through the API with models
  that evaluate one row at a time (RowByRow): that isolates what dgfast controls (seeds, labels,
  sharding, file names) from the math library;
- the CLI runs compare equal batch sizes, all with one thread (torchrun's default
  OMP_NUM_THREADS=1; the in-process runs set torch.set_num_threads(1)).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import dgfast
from dgfast import cli
from dgfast.distributed import (make_npz, sample_label, sample_seed, sample_to_dir, to_uint8,
                                finished_indices)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)
NUM_CLASSES = 10
IMAGE_SIZE = 32     # latents 4x4
STEPS = "5"


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints and a tiny VAE on disk
# ----------------------------------------------------------------------------------------------

def tiny_dit(num_classes: int, seed: int) -> dgfast.DiT:
    """Upstream init, then the zero-initialised adaLN/final layers made random so outputs depend on
    x, t and the label."""
    torch.manual_seed(seed)
    m = dgfast.DiT(input_size=IMAGE_SIZE // 8, num_classes=num_classes, **ARCH)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    dgfast.save_safetensors(tiny_dit(NUM_CLASSES, 1).state_dict(), d / "ft.safetensors")
    torch.save({"ema": tiny_dit(1000, 2).state_dict()}, d / "pre.pt")    # a train.py-style dict
    (d / "arch.json").write_text(json.dumps(ARCH))
    return SimpleNamespace(dir=d, ft=str(d / "ft.safetensors"), pre=str(d / "pre.pt"), arch=str(d / "arch.json"))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    d = tmp_path_factory.mktemp("vae") / "vae"
    torch.manual_seed(3)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=IMAGE_SIZE).save_pretrained(d)
    return str(d)


def sample_args(ckpts, sample_dir, *extra):
    return ["sample", "--model-config", ckpts.arch, "--ckpt", ckpts.ft, "--pretrained-ckpt", ckpts.pre,
            "--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES), "--num-sampling-steps", STEPS,
            "--sample-dir", str(sample_dir), "--no-progress", *extra]


def env(**extra):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             DGFAST_NO_JIT=os.environ.get("DGFAST_NO_JIT", "1"))
    e.update(extra)
    return e


def torchrun(nproc, args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dgfast", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def files(d, ext):
    return sorted(f for f in os.listdir(d) if f.endswith("." + ext))


def read_all(d, ext):
    return {f: open(os.path.join(d, f), "rb").read() for f in files(d, ext)}


# ----------------------------------------------------------------------------------------------
# Quantisation and .npz
# ----------------------------------------------------------------------------------------------

def test_to_uint8_is_dit_quantisation():
    # x with 127.5*x exactly an integer m: 127.5x + 127.5 = m + 127.5 is an exact tie, DiT gives m + 128
    xs, want = [], []
    for m in range(-127, 128):
        x = torch.tensor(m / 127.5, dtype=torch.float32)
        if (127.5 * x).item() == m:
            xs.append(x.item())
            want.append(m + 128)
    ties = torch.tensor(xs)
    assert len(xs) > 100
    # half-to-even would round some of these ties down: the test really holds ties
    assert (torch.round(127.5 * ties + 127.5) != torch.tensor(want, dtype=torch.float32)).any()
    edges = [-1.0, 1.0, -1.5, 3.0, -1e9, 1e9, 0.0, -0.0, 0.999, -0.9999, 1 / 255]
    want += [0, 255, 0, 255, 0, 255, 128, 128, 255, 0, 128]
    x = torch.tensor(xs + edges, dtype=torch.float32).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, len(want), 3)            # NHWC
    assert out[0, 0, :, 0].tolist() == want
    assert (out[..., 0] == out[..., 2]).all()


def test_make_npz_stacks_pngs_in_index_order(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    Image.fromarray(imgs[0]).save(tmp_path / "000003.png")                             # beyond num: ignored
    path = make_npz(tmp_path, 3)
    assert path == str(tmp_path) + ".npz"
    arr = np.load(path)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 8, 6, 3)
    np.testing.assert_array_equal(arr, imgs)
    arr = np.load(make_npz(tmp_path, 2, resize=5))["arr_0"]
    want = np.asarray(Image.fromarray(imgs[1]).convert("RGB").resize((5, 5), Image.BILINEAR))
    assert arr.shape == (2, 5, 5, 3)
    np.testing.assert_array_equal(arr[1], want)
    with pytest.raises(FileNotFoundError, match="000004.png is missing"):
        make_npz(tmp_path, 6)
    (tmp_path / "000001.png").write_bytes(b"garbage")  # damaged: named, with the way out
    with pytest.raises(ValueError, match=r"000001.png: cannot read this sample.*--resume"):
        make_npz(tmp_path, 3)
    Image.fromarray(imgs[0][:4]).save(tmp_path / "000001.png")  # another run's size
    with pytest.raises(ValueError, match=r"000001.png holds shape \(4, 6, 3\)"):
        make_npz(tmp_path, 3)


def test_per_sample_seeds_and_labels_are_functions_of_the_index():
    assert [sample_seed(0, i) for i in range(3)] == [0, 1, 2]
    assert sample_seed(1, 5) == 0x9E3779B9 + 5 and sample_seed(2, 5) == (2 * 0x9E3779B9 + 5) % 2 ** 32
    # torch's CPU generator only uses 32 bits of a seed: distinct global seeds must still differ there
    assert all(0 <= sample_seed(g, i) < 2 ** 32 for g in (0, 1, 2 ** 31 - 1) for i in (0, 2 ** 32 - 1))
    assert len({sample_seed(g, i) for g in range(50) for i in range(1000)}) == 50 * 1000
    labels = [sample_label(0, i, NUM_CLASSES) for i in range(200)]
    assert labels == [sample_label(0, i, NUM_CLASSES) for i in range(200)]
    assert set(labels) == set(range(NUM_CLASSES))
    assert labels != [sample_label(1, i, NUM_CLASSES) for i in range(200)]


# ----------------------------------------------------------------------------------------------
# Any world size, any batch size: identical files (API, two processes with gloo)
# ----------------------------------------------------------------------------------------------

class RowByRow(nn.Module):
    """A DiT evaluated one sample at a time: its outputs cannot depend on the batch."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.in_channels, self.out_channels = inner.in_channels, inner.out_channels
        self.input_size, self.learn_sigma = inner.input_size, inner.learn_sigma
        self.y_embedder = inner.y_embedder

    def forward(self, x, t, y):
        return torch.cat([self.inner(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(len(x))])


class ToyDecoder:
    """Elementwise 'VAE' (latents -> 3 x 8L x 8L in [-1, 1]); avoids diffusers in the workers."""

    def decode(self, z):
        img = torch.tanh(z[:, :3]).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return SimpleNamespace(sample=img)


def _api_worker(rank, world, port, ckpt_dir, out, batch):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _api_run(ckpt_dir, out, batch)


def _api_run(ckpt_dir, out, batch):
    from dgfast.checkpoint import load_checkpoint
    ft = tiny_dit(NUM_CLASSES, 0)
    ft.load_state_dict(load_checkpoint(os.path.join(ckpt_dir, "ft.safetensors")))
    pre = tiny_dit(1000, 0)
    pre.load_state_dict(load_checkpoint(os.path.join(ckpt_dir, "pre.pt")))
    sample_to_dir(RowByRow(ft).eval(), RowByRow(pre).eval(), out, num_samples=5, batch_size=batch,
                  num_classes=NUM_CLASSES, global_seed=3, vae=ToyDecoder(), steps=STEPS, progress=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one_with_another_batch_size(ckpts, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_api_worker, args=(2, free_port(), str(ckpts.dir), str(tmp_path / "w2"), 3), nprocs=2)
    _api_run(str(ckpts.dir), str(tmp_path / "w1"), 2)
    a, b = read_all(tmp_path / "w2", "png"), read_all(tmp_path / "w1", "png")
    assert sorted(a) == [f"{i:06d}.png" for i in range(5)]
    assert a == b
    assert open(tmp_path / "w2.npz", "rb").read() == open(tmp_path / "w1.npz", "rb").read()
    # the labels really differ between samples and reach the model
    assert len({sample_label(3, i, NUM_CLASSES) for i in range(5)}) > 1


# ----------------------------------------------------------------------------------------------
# The CLI under torchrun
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(ckpts, tmp_path, one_thread):
    args = ["--vae", "none", "--num-fid-samples", "7", "--per-proc-batch-size", "2", "--global-seed", "1"]
    r = torchrun(2, sample_args(ckpts, tmp_path / "tr", *args))
    assert r.returncode == 0, r.stderr
    assert "7 images in" in r.stdout and "images/s" in r.stdout and "2 process(es)" in r.stdout
    with one_thread():
        assert cli.main(sample_args(ckpts, tmp_path / "one", *args)) == 0
    a, b = read_all(tmp_path / "tr", "npy"), read_all(tmp_path / "one", "npy")
    assert sorted(a) == [f"{i:06d}.npy" for i in range(7)] and a == b
    arr = np.load(str(tmp_path / "tr") + ".npz")["arr_0"]
    assert arr.dtype == np.float32 and arr.shape == (7, 4, 4, 4)
    assert len({arr[i].tobytes() for i in range(7)}) == 7
    manifest = json.loads((tmp_path / "tr" / "manifest.json").read_text())
    assert manifest["settings"]["seed_mode"] == "per-sample" and manifest["runs"][0]["world_size"] == 2
    assert manifest["versions"] == {"dgfast": dgfast.__version__, "torch": torch.__version__}


def script_transcription(ft, pre, *, world, n, num, global_seed, cfg_scale, steps):
    """DoG's sample_dog_ddp.py seeding and file naming, rank by rank (the sampler is dgfast.sample
    with the reference noise stream, which stands for p_sample_loop over the doubled batch)."""
    out = {}
    global_batch = n * world
    total = int(math.ceil(num / global_batch) * global_batch)
    for rank in range(world):
        torch.manual_seed(global_seed * world + rank)
        total_so_far = 0
        for _ in range(total // global_batch):
            z = torch.randn(n, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
            y = torch.randint(0, NUM_CLASSES, (n,))
            samples = dgfast.sample(ft, pre, z, y, guidance_scale=cfg_scale, steps=steps, noise="reference")
            for i, s in enumerate(samples):
                out[i * world + rank + total_so_far] = s
            total_so_far += global_batch
    return out


@pytest.mark.slow
def test_torchrun_reference_mode_is_the_scripts_stream(ckpts, tmp_path, one_thread):
    args = ["--vae", "none", "--seed-mode", "reference", "--num-fid-samples", "9", "--per-proc-batch-size", "2",
            "--global-seed", "5", "--cfg-scale", "1.5"]
    r = torchrun(2, sample_args(ckpts, tmp_path / "ref", *args))
    assert r.returncode == 0, r.stderr
    ft, pre = cli.load_dit("--ckpt", ckpts.ft, ARCH, IMAGE_SIZE, NUM_CLASSES, "cpu", "auto"), \
        cli.load_dit("--pretrained-ckpt", ckpts.pre, ARCH, IMAGE_SIZE, 1000, "cpu", "auto")
    with one_thread():
        want = script_transcription(ft, pre, world=2, n=2, num=9, global_seed=5, cfg_scale=1.5, steps=STEPS)
    got = files(tmp_path / "ref", "npy")
    assert got == [f"{i:06d}.npy" for i in range(9)]          # 12 computed, the first 9 written
    for i in range(9):
        np.testing.assert_array_equal(np.load(tmp_path / "ref" / got[i]), want[i].numpy())
    arr = np.load(str(tmp_path / "ref") + ".npz")["arr_0"]
    assert arr.dtype == np.float32 and arr.shape == (9, 4, 4, 4)


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------

def _run_until(ckpts, out, done: int, samples: int = 12, **env_extra):
    """(args, process): a `samples`-sample `dgfast sample` run in a subprocess, returned once `done`
    samples are finished (or it ended, or 120 s passed), for the interruption tests."""
    args = sample_args(ckpts, out, "--vae", "none", "--num-fid-samples", str(samples), "--per-proc-batch-size", "1",
                       "--num-sampling-steps", "30")
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell ignores SIGINT, the child would inherit that and Ctrl-C would not reach it
    proc = subprocess.Popen([sys.executable, "-m", "dgfast", *args], env=env(**env_extra), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and len(finished_indices(str(out), "npy")) >= done:
            break
        time.sleep(0.01)
    return args, proc


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_files(ckpts, tmp_path):
    # The pair picks its GEMM strategies by timing them, and strategies may round differently: every
    # run here reads the first one's choice from one GEMM-choice file, as a user's runs do (the suite
    # turns that cache off elsewhere). Without it a loaded machine could flip a choice between runs.
    gemm_cache = dict(DGFAST_GEMM_CACHE=str(tmp_path / "gemm_choice.json"))
    out = tmp_path / "run"
    args, proc = _run_until(ckpts, out, done=3, **gemm_cache)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    killed_at = len(files(out, "npy"))
    assert 3 <= killed_at < 12
    assert not os.path.exists(str(out) + ".npz")
    (out / ".000011.npy.12345.tmp").write_bytes(b"partial")      # what a kill inside a write leaves

    # without --resume the folder is refused, untouched
    assert cli.main(args) == 2
    assert len(files(out, "npy")) == killed_at
    r = subprocess.run([sys.executable, "-m", "dgfast", *args, "--resume"], env=env(**gemm_cache), cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"{killed_at} already present" in r.stdout
    assert sorted(os.listdir(out)) == [f"{i:06d}.npy" for i in range(12)] + ["manifest.json"]
    straight = sample_args(ckpts, tmp_path / "straight", *args[len(sample_args(ckpts, out)):])
    r = subprocess.run([sys.executable, "-m", "dgfast", *straight], env=env(**gemm_cache), cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(gemm_cache["DGFAST_GEMM_CACHE"])
    assert read_all(out, "npy") == read_all(tmp_path / "straight", "npy")
    assert open(str(out) + ".npz", "rb").read() == open(str(tmp_path / "straight") + ".npz", "rb").read()
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert [run["resume"] for run in runs] == [False, True]


def test_ctrl_c_says_how_to_continue(ckpts, tmp_path):
    # 200 samples and the poll check: the signal must reach a run that is still going
    args, proc = _run_until(ckpts, tmp_path / "run", done=1, samples=200)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err, err


def _reference_run(ckpts, out, *extra):
    return cli.main(sample_args(ckpts, out, "--vae", "none", "--seed-mode", "reference", "--num-fid-samples", "7",
                                "--per-proc-batch-size", "2", *extra))


def test_reference_mode_resume_replays_the_random_stream(ckpts, tmp_path):
    assert _reference_run(ckpts, tmp_path / "full") == 0
    assert _reference_run(ckpts, tmp_path / "part") == 0
    for i in (2, 3, 4):                                       # all of iteration 1, half of iteration 2
        os.remove(tmp_path / "part" / f"{i:06d}.npy")
    os.remove(str(tmp_path / "part") + ".npz")
    assert _reference_run(ckpts, tmp_path / "part", "--resume") == 0
    assert read_all(tmp_path / "part", "npy") == read_all(tmp_path / "full", "npy")


def test_resume_with_other_settings_is_refused(ckpts, tmp_path, capsys):
    assert _reference_run(ckpts, tmp_path / "a", "--num-sampling-steps", "2") == 0
    before = read_all(tmp_path / "a", "npy")
    capsys.readouterr()
    assert _reference_run(ckpts, tmp_path / "a", "--num-sampling-steps", "2", "--global-seed", "1", "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "global_seed: 0 -> 1" in err
    assert read_all(tmp_path / "a", "npy") == before


# ----------------------------------------------------------------------------------------------
# A real diffusers AutoencoderKL directory
# ----------------------------------------------------------------------------------------------

def test_vae_directory_decodes_latents_as_dit_does(ckpts, vae_dir, tmp_path):
    from diffusers import AutoencoderKL
    common = ["--num-fid-samples", "3", "--per-proc-batch-size", "3"]
    assert cli.main(sample_args(ckpts, tmp_path / "lat", "--vae", "none", *common)) == 0
    assert cli.main(sample_args(ckpts, tmp_path / "img", "--vae", vae_dir, "--npz-resize", "40", *common)) == 0
    latents = torch.stack([torch.from_numpy(np.load(tmp_path / "lat" / f"{i:06d}.npy")) for i in range(3)])
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        want = to_uint8(vae.decode(latents / 0.18215).sample).numpy()
    from PIL import Image
    got = np.stack([np.asarray(Image.open(tmp_path / "img" / f"{i:06d}.png")) for i in range(3)])
    np.testing.assert_array_equal(got, want)
    arr = np.load(str(tmp_path / "img") + ".npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 40, 40, 3)


# ----------------------------------------------------------------------------------------------
# Modes without a pre-trained model
# ----------------------------------------------------------------------------------------------

def test_cfg_scale_1_samples_the_finetuned_model_alone(ckpts, tmp_path):
    args = sample_args(ckpts, tmp_path / "plain", "--vae", "none", "--num-fid-samples", "3",
                       "--per-proc-batch-size", "3", "--cfg-scale", "1")
    args.remove("--pretrained-ckpt")
    args.remove(ckpts.pre)
    assert cli.main(args) == 0
    ft = cli.load_dit("--ckpt", ckpts.ft, ARCH, IMAGE_SIZE, NUM_CLASSES, "cpu", "auto")
    y = torch.tensor([sample_label(0, i, NUM_CLASSES) for i in range(3)])
    want = dgfast.sample(ft, None, None, y, guidance_scale=1, steps=STEPS, noise="per-sample", seeds=[0, 1, 2])
    for i in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / "plain" / f"{i:06d}.npy"), want[i].numpy())


def test_without_pretrained_ckpt_guidance_is_classic_cfg(ckpts, tmp_path, capsys):
    args = sample_args(ckpts, tmp_path / "cfg", "--vae", "none", "--num-fid-samples", "2", "--per-proc-batch-size", "2")
    args.remove("--pretrained-ckpt")
    args.remove(ckpts.pre)
    assert cli.main(args) == 0
    assert f"classic CFG, w=1.5, null label {NUM_CLASSES}" in capsys.readouterr().err
    ft = cli.load_dit("--ckpt", ckpts.ft, ARCH, IMAGE_SIZE, NUM_CLASSES, "cpu", "auto")
    y = torch.tensor([sample_label(0, i, NUM_CLASSES) for i in range(2)])
    want = dgfast.sample(ft, ft, None, y, guidance_scale=1.5, steps=STEPS, null_label=NUM_CLASSES,
                         noise="per-sample", seeds=[0, 1])
    np.testing.assert_array_equal(np.load(tmp_path / "cfg" / "000001.npy"), want[1].numpy())


# ----------------------------------------------------------------------------------------------
# Bad arguments: a clear message naming the flag, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------

def _no_null_pretrained(folder) -> str:
    """An ImageNet-size pre-trained model trained without label dropout: 1000 rows, no null row. Its
    last row is class 999, which must not be taken for a null row."""
    m = dgfast.DiT(input_size=IMAGE_SIZE // 8, num_classes=1000, class_dropout_prob=0.0, **ARCH)
    path = str(folder / "pre_no_null.safetensors")
    dgfast.save_safetensors(m.state_dict(), path)
    return path


BAD = {
    "missing checkpoint": (lambda c, t: ["--ckpt", str(t / "nope.pt")], "--ckpt"),
    "no checkpoint": (lambda c, t: ["--ckpt", ""], "--ckpt is required"),
    "missing pretrained": (lambda c, t: ["--pretrained-ckpt", str(t / "nope.pt")], "--pretrained-ckpt"),
    "zero samples": (lambda c, t: ["--num-fid-samples", "0"], "--num-fid-samples"),
    "negative samples": (lambda c, t: ["--num-fid-samples", "-4"], "--num-fid-samples"),
    "zero batch": (lambda c, t: ["--per-proc-batch-size", "0"], "--per-proc-batch-size"),
    "unknown model": (lambda c, t: ["--model", "DiT-Q/3", "--model-config", None], "--model 'DiT-Q/3'"),
    "unknown pretrained model": (lambda c, t: ["--pretrained-model", "DiT-Q/3"], "--pretrained-model"),
    "mismatched model": (lambda c, t: ["--model", "DiT-S/2", "--model-config", None],
                         "--ckpt .* does not fit DiT-S/2 at --image-size 32: "
                         "pos_embed is \\(1, 4, 32\\) in the checkpoint, \\(1, 4, 384\\) in the model"),
    "mismatched image size": (lambda c, t: ["--image-size", "64"],
                              "does not fit .* at --image-size 64: "
                              "pos_embed is \\(1, 4, 32\\) in the checkpoint, \\(1, 16, 32\\)"),
    "mismatched classes": (lambda c, t: ["--num-classes", "20"], "--ckpt .* label table of 11 rows"),
    "hub vae": (lambda c, t: ["--vae", "ema"], "--vae ema: .*does not download"),
    "no vae": (lambda c, t: ["--vae", None], "--vae is required"),
    "bad steps": (lambda c, t: ["--num-sampling-steps", "ddim0"], "--num-sampling-steps"),
    "bad channels": (lambda c, t: ["--guidance-channels", "-1"], "--guidance-channels"),
    "too many channels": (lambda c, t: ["--guidance-channels", "5"], "--guidance-channels 5: the model has 4"),
    "null label outside table": (lambda c, t: ["--null-label", "1001"], "--null-label 1001"),
    "unwritable dir": (lambda c, t: ["--sample-dir", str(t / "a_file" / "out")], "--sample-dir .*not a directory"),
    "reference below 1": (lambda c, t: ["--seed-mode", "reference", "--cfg-scale", "0.5"], "--cfg-scale"),
    "pre-trained table without a null row": (lambda c, t: ["--pretrained-ckpt", _no_null_pretrained(c.dir)],
                                              "--null-label 1000 is outside --pretrained-ckpt's label table "
                                              "\\(1000 rows\\)"),
    "ddim eta above 1": (lambda c, t: ["--sampler", "ddim", "--eta", "2"], "--eta must be in \\[0, 1\\]"),
    "eta with ddpm": (lambda c, t: ["--eta", "0.5"], "--eta 0.5 is DDIM's: --sampler ddpm would ignore it"),
    "eta with a scheduler": (lambda c, t: ["--eta", "0.5", "--scheduler", "unipc"],
                             "--eta 0.5 is DDIM's: --scheduler unipc would ignore it"),
    "scheduler with a respacing string": (lambda c, t: ["--scheduler", "dpmpp-2m-karras", "--num-sampling-steps",
                                                        "ddim10"], "--num-sampling-steps must be an int with --sch"),
    "scheduler in reference mode": (lambda c, t: ["--scheduler", "dpmpp-2m-karras", "--seed-mode", "reference"],
                                    "--scheduler needs --seed-mode per-sample"),
    "pretrained every 0": (lambda c, t: ["--pretrained-every", "0"], "--pretrained-every must be >= 1, got 0"),
    "model config a JSON list": (lambda c, t: ["--model-config", "[1, 2]"],
                                 "--model-config must be a JSON object .*got a JSON list: \\[1, 2\\]"),
    "model config a JSON number": (lambda c, t: ["--model-config", "42"], "--model-config must be a JSON object"),
    "model config file holding a list": (lambda c, t: ["--model-config", _json_file(c.dir, [1, 2])],
                                         "--model-config .*list.json must be a JSON object"),
    "model config neither JSON nor a file": (lambda c, t: ["--model-config", "arch.jsn"],
                                             "--model-config arch.jsn: no such file"),
    "model config broken JSON object": (lambda c, t: ["--model-config", '{"depth": 2,'],
                                        "--model-config is not valid JSON"),
    "num classes reaching the null row": (lambda c, t: ["--num-classes", str(NUM_CLASSES + 1)],
                                          f"label table of {NUM_CLASSES + 1} rows and --num-classes is "
                                          f"{NUM_CLASSES + 1}: .*null row.*--no-null-row"),
}


def _json_file(folder, value) -> str:
    path = folder / "list.json"
    path.write_text(json.dumps(value))
    return str(path)


def _with(args, changes):
    args = list(args)
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        if value is not None:
            args += [flag, value]
    return args


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_fail_clearly_and_write_nothing(case, ckpts, tmp_path, capsys):
    import re
    change, message = BAD[case]
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    args = _with(sample_args(ckpts, out, "--vae", "none", "--num-fid-samples", "2"), change(ckpts, tmp_path))
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err
    assert err.startswith("dgfast sample: error: ")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_non_empty_dir_without_resume_is_refused(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(sample_args(ckpts, out, "--vae", "none", "--num-fid-samples", "2")) == 2
    err = capsys.readouterr().err
    assert "--sample-dir" in err and "not empty" in err and "--resume" in err
    assert os.listdir(out) == ["keep.txt"] and not os.path.exists(str(out) + ".npz")


def test_sample_is_a_registered_subcommand(capsys):
    assert "sample" in cli.COMMANDS
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "sample" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Checkpoint files: corrupt ones fail in one line, pickles run only with --trust-checkpoint
# ----------------------------------------------------------------------------------------------

def _corrupt(kind: str, ckpts, folder) -> str:
    if kind == "garbage.pt":
        data = b"not a checkpoint at all" * 10
    elif kind == "empty.pt":
        data = b""
    else:  # a cut-short .safetensors
        data = open(ckpts.ft, "rb").read()[:3000]
    path = folder / kind
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("flag", ["--ckpt", "--pretrained-ckpt"])
@pytest.mark.parametrize("kind", ["garbage.pt", "empty.pt", "truncated.safetensors"])
def test_corrupt_checkpoint_is_a_one_line_error(kind, flag, ckpts, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    path = _corrupt(kind, ckpts, tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(_with(sample_args(ckpts, out, "--vae", "none", "--num-fid-samples", "2"), [flag, path])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dgfast sample: error: {flag} {path}: cannot load it: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.exists()


class _Hostile:
    """Unpickles as a call of os.getpid: harmless here, but a global weights_only refuses."""
    def __reduce__(self):
        return (os.getpid, ())


def test_checkpoint_pickling_code_needs_trust_checkpoint(ckpts, tmp_path, capsys):
    sd = torch.load(ckpts.pre, weights_only=True)["ema"]
    path = tmp_path / "hostile.pt"
    torch.save({"ema": sd, "args": _Hostile()}, path)
    args = _with(sample_args(ckpts, tmp_path / "out", "--vae", "none", "--num-fid-samples", "1",
                             "--per-proc-batch-size", "1"), ["--pretrained-ckpt", str(path)])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle posix.getpid" in err and "--trust-checkpoint" in err, err
    assert not (tmp_path / "out").exists()
    assert cli.main(args + ["--trust-checkpoint"]) == 0
    assert files(tmp_path / "out", "npy") == ["000000.npy"]


def test_upstream_train_checkpoint_needs_no_trust(ckpts, tmp_path):
    import argparse
    sd = torch.load(ckpts.pre, weights_only=True)["ema"]
    path = tmp_path / "0400000.pt"  # train.py's layout, args pickled as an argparse.Namespace
    torch.save({"model": sd, "ema": sd, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000)}, path)
    args = _with(sample_args(ckpts, tmp_path / "out", "--vae", "none", "--num-fid-samples", "1",
                             "--per-proc-batch-size", "1"), ["--pretrained-ckpt", str(path)])
    with pytest.warns(UserWarning, match="'ema'"):
        assert cli.main(args) == 0
    assert files(tmp_path / "out", "npy") == ["000000.npy"]


# ----------------------------------------------------------------------------------------------
# A pre-trained model that is not an ImageNet DiT: the shipped zoo pair
# ----------------------------------------------------------------------------------------------

ZOO = os.path.join(ROOT, "dgfast", "zoo")


def _zoo_args(out, *extra):
    arch = dict(patch_size=4, in_channels=3, hidden_size=128, depth=6, num_heads=4, learn_sigma=True)
    return ["sample", "--model-config", json.dumps(arch), "--image-size", "128", "--vae", "none",
            "--num-classes", "5", "--ckpt", os.path.join(ZOO, "finetuned.safetensors"),
            "--pretrained-ckpt", os.path.join(ZOO, "pretrained.safetensors"), "--num-sampling-steps", "3",
            "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--sample-dir", str(out), "--no-progress",
            *extra]


def test_zoo_pair_domain_guidance_infers_the_pretrained_label_table(tmp_path, capsys, one_thread):
    import dgfast.zoo
    with one_thread():
        assert cli.main(_zoo_args(tmp_path / "dog")) == 0
        assert "Domain Guidance, w=1.5, null label 10" in capsys.readouterr().err  # 11 rows: 10 classes + null
        ft, pre, _ = dgfast.zoo.load_pair()
        y = torch.tensor([sample_label(0, i, 5) for i in range(2)])
        want = dgfast.sample(ft, pre, None, y, guidance_scale=1.5, steps="3", null_label=10, noise="per-sample",
                             seeds=[0, 1])
    got = torch.stack([torch.from_numpy(np.load(tmp_path / "dog" / f"{i:06d}.npy")) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pretrained_num_classes_is_checked_against_the_table(tmp_path, capsys):
    assert cli.main(_zoo_args(tmp_path / "dog", "--pretrained-num-classes", "1000")) == 2
    err = capsys.readouterr().err
    assert "label table of 11 rows; --pretrained-num-classes 1000 needs 1000 or 1001" in err, err
    assert cli.main(_zoo_args(tmp_path / "dog", "--pretrained-num-classes", "0")) == 2
    assert "--pretrained-num-classes must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "dog").exists()


# ----------------------------------------------------------------------------------------------
# Resume and run-time errors
# ----------------------------------------------------------------------------------------------

def _small(ckpts, out, *extra):
    return sample_args(ckpts, out, "--vae", "none", "--num-fid-samples", "2", "--per-proc-batch-size", "1", *extra)


def test_resume_accepts_the_same_checkpoint_spelled_differently(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_with(_small(ckpts, out), ["--ckpt", os.path.relpath(ckpts.ft)])) == 0
    os.remove(out / "000001.npy")
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpts.ft)
    assert cli.main(_with(_small(ckpts, out, "--resume"), ["--ckpt", str(link)])) == 0
    assert files(out, "npy") == ["000000.npy", "000001.npy"]
    # another file: the message names the one setting that differs, not the whole run dict
    other = tmp_path / "other.pt"
    torch.save(torch.load(ckpts.pre, weights_only=True), other)
    capsys.readouterr()
    assert cli.main(_with(_small(ckpts, out, "--resume"), ["--pretrained-ckpt", str(other)])) == 2
    err = capsys.readouterr().err
    assert f"run.pretrained_ckpt: {os.path.realpath(ckpts.pre)!r} -> {str(other)!r}" in err, err
    assert "image_size" not in err


def test_resume_refuses_a_checkpoint_replaced_at_the_same_path(ckpts, tmp_path, capsys):
    """Same path, other weights (a newer fine-tune saved over the old file): the folder would mix
    two models' samples. The manifest keeps a digest of the loaded weights."""
    ft = tmp_path / "ft.safetensors"
    shutil.copy(ckpts.ft, ft)
    out = tmp_path / "out"
    assert cli.main(_with(_small(ckpts, out), ["--ckpt", str(ft)])) == 0
    os.remove(out / "000001.npy")
    dgfast.save_safetensors(tiny_dit(NUM_CLASSES, 7).state_dict(), ft)
    capsys.readouterr()
    assert cli.main(_with(_small(ckpts, out, "--resume"), ["--ckpt", str(ft)])) == 2
    assert "run.ckpt_sha256" in capsys.readouterr().err
    # a folder from before the digests were recorded still resumes (nothing to compare against)
    shutil.copy(ckpts.ft, ft)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("ckpt_sha256", "pretrained_sha256"):
        del manifest["settings"]["run"][key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(_with(_small(ckpts, out, "--resume"), ["--ckpt", str(ft)])) == 0
    assert files(out, "npy") == ["000000.npy", "000001.npy"]


def _edit_in_place(path, edit):
    """Load the safetensors at path, apply edit(state_dict) to it, save it back at the same path."""
    from dgfast.checkpoint import load_checkpoint
    sd = load_checkpoint(path)
    edit(sd)
    dgfast.save_safetensors(sd, path)


@pytest.mark.parametrize("edit", [
    lambda sd: sd["blocks.0.mlp.fc1.weight"].view(-1)[1].add_(0.5),        # one weight (the reported case)
    lambda sd: sd["blocks.1.attn.qkv.weight"].view(-1)[3:13].mul_(3),       # ten weights
    lambda sd: sd["final_layer.linear.bias"].view(torch.int32)[5].bitwise_xor_(1),  # one bit of one float
], ids=["one fc1 weight", "ten qkv weights", "one bit"])
def test_resume_refuses_a_checkpoint_edited_in_place(edit, ckpts, tmp_path, capsys):
    """A few values edited at the same path: 64 sampled values per tensor missed these; every byte counts now."""
    from dgfast.checkpoint import load_checkpoint
    ft = tmp_path / "ft.safetensors"
    shutil.copy(ckpts.ft, ft)
    out = tmp_path / "out"
    assert cli.main(_with(_small(ckpts, out), ["--ckpt", str(ft)])) == 0
    os.remove(out / "000001.npy")
    before = load_checkpoint(str(ft))
    _edit_in_place(str(ft), edit)
    assert sum(int((a != b).sum()) for a, b in zip(before.values(), load_checkpoint(str(ft)).values())) in (1, 10)
    capsys.readouterr()
    assert cli.main(_with(_small(ckpts, out, "--resume"), ["--ckpt", str(ft)])) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "run.ckpt_sha256" in err, err
    assert files(out, "npy") == ["000000.npy"]


def test_resume_of_a_folder_with_the_older_sampled_digest(ckpts, tmp_path, capsys):
    """A manifest from before the full digest holds the 64-value one: it still resumes (checked against
    that digest, with a note), records the full digest from then on, and still refuses other weights."""
    from dgfast.checkpoint import sampled_weights_digest
    out = tmp_path / "out"
    assert cli.main(_small(ckpts, out)) == 0
    ft = cli.load_dit("--ckpt", ckpts.ft, ARCH, IMAGE_SIZE, NUM_CLASSES, "cpu", "auto")
    pre = cli.load_dit("--pretrained-ckpt", ckpts.pre, ARCH, IMAGE_SIZE, 1000, "cpu", "auto")
    manifest = json.loads((out / "manifest.json").read_text())
    run = manifest["settings"]["run"]
    del run["ckpt_sha256"], run["pretrained_sha256"]
    run.update(ckpt_weights=sampled_weights_digest(ft), pretrained_weights=sampled_weights_digest(pre))
    (out / "manifest.json").write_text(json.dumps(manifest))
    os.remove(out / "000001.npy")
    capsys.readouterr()
    assert cli.main(_small(ckpts, out, "--resume")) == 0
    assert "older dgfast" in capsys.readouterr().err
    run = json.loads((out / "manifest.json").read_text())["settings"]["run"]
    assert run["ckpt_sha256"].startswith("sha256:") and run["ckpt_weights"] == sampled_weights_digest(ft)
    # the old digest still guards such a folder against another checkpoint
    run.pop("ckpt_sha256")
    manifest["settings"]["run"] = run
    (out / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "other.safetensors"
    dgfast.save_safetensors(tiny_dit(NUM_CLASSES, 7).state_dict(), other)
    os.remove(out / "000001.npy")
    assert cli.main(_with(_small(ckpts, out, "--resume"), ["--ckpt", str(other)])) == 2
    assert "run.ckpt_weights" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{", "{}", "[1, 2]"])
def test_damaged_manifest_is_a_one_line_error_naming_it(text, ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_small(ckpts, out)) == 0
    (out / "manifest.json").write_text(text)
    capsys.readouterr()
    assert cli.main(_small(ckpts, out, "--resume")) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the setup line: the error comes once the models are loaded
    assert last.startswith("dgfast sample: error: ") and str(out / "manifest.json") in last, err
    assert "Traceback" not in err


@pytest.mark.filterwarnings("ignore:dgfast.sample")
def test_nan_batch_is_a_one_line_error(ckpts, tmp_path, capsys):
    sd = tiny_dit(NUM_CLASSES, 1).state_dict()
    sd["final_layer.linear.bias"] = torch.full_like(sd["final_layer.linear.bias"], float("nan"))
    bad = tmp_path / "nan.safetensors"
    dgfast.save_safetensors(sd, bad)
    out = tmp_path / "out"
    assert cli.main(_with(_small(ckpts, out), ["--ckpt", str(bad)])) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("dgfast sample: error: sample 0 (label 0) diverged: NaN/inf first at "
                                           "step 1 of 5, in the finetuned model's output"), err
    assert "Traceback" not in err


def test_sample_to_dir_checks_num_classes_against_the_table_before_writing(ckpts, tmp_path):
    ft = cli.load_dit("--ckpt", ckpts.ft, ARCH, IMAGE_SIZE, NUM_CLASSES, "cpu", "auto")  # 11 rows
    with pytest.raises(ValueError, match=r"num_classes 99 \(dgfast sample: --num-classes\).*11 rows"):
        sample_to_dir(ft, None, tmp_path / "out", num_samples=2, batch_size=2, num_classes=99, guidance_scale=1,
                      steps=STEPS, progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Flags that used to be accepted and silently change the samples (issue 13)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", [("--model", "DiT-S/2", "--model-config"),
                                  ("--uncond-ckpt", None, "--pretrained-ckpt"),
                                  ("--uncond-model", "DiT-S/2", "--pretrained-model")])
def test_flags_that_set_one_thing_twice_are_refused(pair, ckpts, tmp_path, capsys):
    flag, value, other = pair
    args = sample_args(ckpts, tmp_path / "out", "--vae", "none", "--num-fid-samples", "1",
                       "--pretrained-model", "DiT-S/2")
    args += [flag, value or ckpts.pre]
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: not allowed with argument {other}" in err or \
        f"argument {other}: not allowed with argument {flag}" in err, err
    assert not (tmp_path / "out").exists()


def test_guidance_interval_and_scheduler_flags_are_checked(ckpts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = sample_args(ckpts, out, "--vae", "none", "--num-fid-samples", "2")
    assert cli.main(base + ["--guidance-interval", "0.8", "0.2"]) == 2
    assert "--guidance-interval 0.8 0.2: need 0 <= START < 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one of the two
        cli.main(base + ["--sampler", "ddim", "--scheduler", "unipc"])
    assert "not allowed with argument" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    assert cli.main(base + ["--scheduler", "dpmpp-2m-karras", "--num-sampling-steps", "4"]) == 2
    assert "--scheduler dpmpp-2m-karras is a diffusers scheduler, and diffusers is not installed: pip install " \
        "diffusers" in capsys.readouterr().err
    assert not out.exists()


def test_zoo_pair_with_the_recommended_scheduler(tmp_path, capsys, one_thread):
    """--scheduler dpmpp-2m-sde-karras --guidance-interval 0.4 1 --pretrained-every 2 (README's
    recommendation, there with 17 steps; per-sample seeds reach the SDE's step noise too) writes what
    dgfast.sample gives with the same settings; a resume without the interval is refused."""
    pytest.importorskip("diffusers")
    import dgfast.zoo
    out = tmp_path / "dog"
    interval = ["--guidance-interval", "0.4", "1"]
    flags = ["--scheduler", "dpmpp-2m-sde-karras", "--num-sampling-steps", "6", "--pretrained-every", "2"]
    with one_thread():
        assert cli.main(_zoo_args(out, *flags, *interval)) == 0
        ft, pre, _ = dgfast.zoo.load_pair()
        y = torch.tensor([sample_label(0, i, 5) for i in range(2)])
        common = dict(guidance_scale=1.5, steps=6, null_label=10, noise="per-sample",
                      seeds=[sample_seed(0, i) for i in range(2)], scheduler="dpmpp-2m-sde-karras")
        want = dgfast.sample(ft, pre, None, y, guidance_interval=(0.4, 1.0), pretrained_every=2, **common)
        others = [dgfast.sample(ft, pre, None, y, pretrained_every=2, **common),
                  dgfast.sample(ft, pre, None, y, guidance_interval=(0.4, 1.0), **common)]
    got = torch.stack([torch.from_numpy(np.load(out / f"{i:06d}.npy")) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all((got - other).abs().max() > 1e-3 for other in others)  # both controls reached the sampler
    capsys.readouterr()
    assert cli.main(_zoo_args(out, *flags, "--resume")) == 2
    assert "guidance_interval: [0.4, 1.0] -> None" in capsys.readouterr().err
    assert cli.main(_zoo_args(out, *flags, *interval, "--resume")) == 0


def test_no_null_row_is_needed_for_a_table_of_num_classes_rows(tmp_path, capsys, one_thread):
    """The zoo's fine-tuned model: 5 classes + its null row (6 rows). --num-classes 6 would draw the
    null row as a sixth class; it takes --no-null-row (a model trained without label dropout)."""
    assert cli.main(_with(_zoo_args(tmp_path / "a"), ["--num-classes", "6"])) == 2
    err = capsys.readouterr().err
    assert "label table of 6 rows and --num-classes is 6" in err and "--num-classes 5, or --no-null-row" in err, err
    assert cli.main(_zoo_args(tmp_path / "b", "--no-null-row")) == 2  # 5 classes, 6 rows: not a table without one
    assert "--no-null-row with --num-classes 5 needs exactly 5" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with one_thread():
        assert cli.main(_with(_zoo_args(tmp_path / "c", "--no-null-row"), ["--num-classes", "6"])) == 0


def test_sample_to_dir_refuses_num_classes_reaching_the_null_row(ckpts, tmp_path):
    ft = cli.load_dit("--ckpt", ckpts.ft, ARCH, IMAGE_SIZE, NUM_CLASSES, "cpu", "auto")  # 10 classes + null row
    with pytest.raises(ValueError, match=rf"num_classes {NUM_CLASSES + 1} .*reaches the finetuned model's null row "
                                         rf"\(label {NUM_CLASSES} "):
        sample_to_dir(ft, None, tmp_path / "out", num_samples=2, batch_size=2, num_classes=NUM_CLASSES + 1,
                      guidance_scale=1, steps=STEPS, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(dgfast.ops.cpp_extension() is None, reason="needs the C++ backend")
def test_resume_with_another_backend_is_refused(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_small(ckpts, out, "--backend", "torch")) == 0
    os.remove(out / "000001.npy")
    before = read_all(out, "npy")
    capsys.readouterr()
    assert cli.main(_small(ckpts, out, "--backend", "cpp", "--resume")) == 2
    assert "backend: 'torch' -> 'cpp'" in capsys.readouterr().err
    assert read_all(out, "npy") == before
    assert cli.main(_small(ckpts, out, "--backend", "torch", "--resume")) == 0


def test_sample_to_dir_checks_its_flags_before_writing(ckpts, tmp_path):
    ft = cli.load_dit("--ckpt", ckpts.ft, ARCH, IMAGE_SIZE, NUM_CLASSES, "cpu", "auto")
    common = dict(num_samples=1, batch_size=1, num_classes=NUM_CLASSES, guidance_scale=1, steps=STEPS)
    with pytest.raises(TypeError, match=r"\bresume must be True or False"):
        sample_to_dir(ft, None, tmp_path / "out", resume="no", **common)
    with pytest.raises(ValueError, match=r"\beta=0.5\b.*'ddpm' does not use it"):
        sample_to_dir(ft, None, tmp_path / "out", eta=0.5, **common)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Divergence: the step, the model and the samples; finished files kept; a recurrence said so
# ----------------------------------------------------------------------------------------------

def _broken_label_ckpt(folder, label: int, value: float) -> str:
    """The fine-tuned checkpoint with label `label`'s embedding row set to `value`: samples of that
    class come out NaN (or explode), all others are untouched."""
    sd = tiny_dit(NUM_CLASSES, 1).state_dict()
    sd["y_embedder.embedding_table.weight"][label] = value
    path = str(folder / f"broken{label}.safetensors")
    dgfast.save_safetensors(sd, path)
    return path


def test_a_class_that_diverges_stops_the_run_and_is_remembered(ckpts, tmp_path, capsys):
    label = sample_label(0, 2, NUM_CLASSES)
    assert label not in (sample_label(0, 0, NUM_CLASSES), sample_label(0, 1, NUM_CLASSES))
    out = tmp_path / "out"
    args = _with(sample_args(ckpts, out, "--vae", "none", "--num-fid-samples", "4", "--per-proc-batch-size", "1"),
                 ["--ckpt", _broken_label_ckpt(tmp_path, label, float("nan"))])
    assert cli.main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"dgfast sample: error: sample 2 (label {label}) diverged: NaN/inf first at step 1 of 5, "
                          f"in the finetuned model's output; the samples written so far are kept"), err
    assert "earlier run" not in err
    assert files(out, "npy") == ["000000.npy", "000001.npy"] and not os.path.exists(str(out) + ".npz")
    assert cli.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "Samples 2 diverged in an earlier run of this folder too: with these settings they always will" in err
    assert files(out, "npy") == ["000000.npy", "000001.npy"]


def test_exploding_samples_stop_the_run(ckpts, tmp_path, capsys):
    sd = tiny_dit(NUM_CLASSES, 1).state_dict()
    sd["final_layer.linear.bias"] += 1e30  # finite, absurd eps: ddim's x explodes without NaN
    bad = tmp_path / "explodes.safetensors"
    dgfast.save_safetensors(sd, bad)
    out = tmp_path / "out"
    assert cli.main(_with(_small(ckpts, out, "--sampler", "ddim"), ["--ckpt", str(bad)])) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "sample 0 (label" in err and "diverged: |x| = " in err and "> 10000 first at step 1 of 5, in the " \
        "finetuned model's output" in err, err
    assert files(out, "npy") == []


def test_vae_decoding_to_nan_stops_the_run(ckpts, vae_dir, tmp_path, capsys):
    """A VAE that decodes finite latents to NaN used to write black-red PNGs and exit 0."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] = float("nan")
    bad = tmp_path / "nan_vae"
    vae.save_pretrained(bad)
    out = tmp_path / "out"
    assert cli.main(sample_args(ckpts, out, "--vae", str(bad), "--num-fid-samples", "2",
                                "--per-proc-batch-size", "2")) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("dgfast sample: error: samples 0..1 (labels ") and \
        "diverged: the VAE decoded them to NaN/inf (their latents were finite)" in err, err
    assert files(out, "png") == [] and not os.path.exists(str(out) + ".npz")


def test_diverged_padding_rows_are_not_an_error(tmp_path):
    from dgfast.distributed import SamplingDiverged, _Batch
    batch = _Batch([8, 9, 10, 11], [0, 1, 2, 3], num_samples=10, sample_dir=str(tmp_path))
    batch.stop_if_diverged([2, 3], "NaN")  # indices 10, 11: computed for the block's shape, never written
    with pytest.raises(SamplingDiverged, match="sample 9 \\(label 1\\) diverged: NaN"):
        batch.stop_if_diverged([1, 3], "NaN")


# ----------------------------------------------------------------------------------------------
# One writer per folder
# ----------------------------------------------------------------------------------------------

def test_second_resume_on_a_folder_being_written_is_one_line(ckpts, tmp_path, capsys):
    """The reported case: a second --resume deleted the first process's temp file and crashed it."""
    out = tmp_path / "run"
    args, proc = _run_until(ckpts, out, done=1)
    try:
        assert proc.poll() is None, "the first run ended before the second started"
        code = cli.main(args + ["--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"dgfast sample: error: --sample-dir {out} is being written by another dgfast run "
                                 f"(pid {proc.pid} on "), err
    finally:
        rest = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, rest
    assert files(out, "npy") == [f"{i:06d}.npy" for i in range(12)] and os.path.exists(str(out) + ".npz")
    assert sorted(os.listdir(out)) == [f"{i:06d}.npy" for i in range(12)] + ["manifest.json"]
