"""dgfast.sample / dog_forward / DiT / load_checkpoint against the literal upstream transcription
in dgfast.reference (ReferenceDiT, ReferenceDiffusion, dog_guidance_fn).

Tolerances: model forwards are compared at 1e-5 relative (max |a - b| / max |b|): the fused ops
and the reference's op-by-op path may round differently. The sampler step itself is compared
bitwise, with a synthetic elementwise model whose outputs cannot depend on batching.
"""
import argparse
import contextlib
import math
import os
import warnings
from unittest import mock

import numpy as np

import pytest
import torch
import torch.nn as nn

import dgfast
from dgfast import ops
from dgfast.reference import ReferenceDiffusion, ReferenceDiT, ReferenceDiT_models, dog_guidance_fn

RTOL = 1e-5
NULL = 1000

# Small configs: DiT-S/4-like blocks at toy width so a 50-step two-model loop takes seconds.
FT_CFG = dict(input_size=8, patch_size=4, hidden_size=48, depth=2, num_heads=3, num_classes=10)
PRE_CFG = dict(FT_CFG, num_classes=1000)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model, seed, std=0.05):
    """Every parameter random and non-zero (upstream's zero-init adaLN would make outputs trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def make_pair(cfg, seed):
    """(dgfast.DiT, ReferenceDiT) in eval mode holding the same random state_dict."""
    fast = randomize(dgfast.DiT(**cfg), seed).eval()
    ref = ReferenceDiT(**cfg).eval()
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


@pytest.fixture(scope="module")
def models():
    ft, ft_ref = make_pair(FT_CFG, 1)
    pre, pre_ref = make_pair(PRE_CFG, 2)
    return dict(ft=ft, ft_ref=ft_ref, pre=pre, pre_ref=pre_ref)


def latents(n, seed=0, size=8):
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(seed))


def backends_available():
    """Every backend, each skipped with its reason when it cannot run here."""
    params = [pytest.param("torch", id="torch")]
    cpp = ops.cpp_extension()
    params.append(pytest.param("cpp", id="cpp", marks=[] if cpp is not None else pytest.mark.skip(
        reason="C++ extension not built/loadable (dgfast.ops.cpp_extension() is None; DGFAST_NO_JIT=1 disables JIT)")))
    kernels = ops.triton_kernels()
    reason = None
    if kernels is None:
        reason = "dgfast.kernels (Triton) not importable"
    elif not ops.triton_interpreting():  # these tests sample on CPU tensors
        reason = ("CPU tensors, compiled Triton: needs TRITON_INTERPRET=1 (the cuda-marked tests cover CUDA)"
                  if torch.cuda.is_available() else "no CUDA and TRITON_INTERPRET is not 1")
    params.append(pytest.param("triton", id="triton",
                               marks=[] if reason is None else pytest.mark.skip(reason=reason)))
    return params


# ==============================================================================================
# (1) model forward
# ==============================================================================================

FORWARD_CFGS = [
    # DiT-S/4-ish blocks, latent 16, odd batch
    (dict(input_size=16, patch_size=4, hidden_size=64, depth=3, num_heads=4, num_classes=10), 3),
    # patch 2, latent 8, DogFit-style table without a null row, no learned sigma
    (dict(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=3, num_classes=7, class_dropout_prob=0.0,
          learn_sigma=False), 5),
]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("cfg,batch", FORWARD_CFGS)
def test_forward_matches_reference(cfg, batch, backend):
    fast, ref = make_pair(cfg, 3)
    fast.set_backend(backend)
    L = cfg["input_size"]
    x = torch.randn(batch, 4, L, L, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([999, 0, 500, 17, 250][:batch])
    y = torch.tensor([0, 6, 3, 1, 2][:batch])
    with torch.no_grad():
        out, want = fast(x, t, y), ref(x, t, y)
    assert out.shape == want.shape == (batch, fast.out_channels, L, L)
    assert want.std() > 0.1  # the random weights make a non-trivial function
    assert rel_err(out, want) <= RTOL


def test_forward_with_cfg_matches_reference(models):
    x = latents(6, 5)
    t = torch.full((6,), 321)
    y = torch.tensor([1, 2, 3, NULL, NULL, NULL])
    with torch.no_grad():
        out = models["pre"].forward_with_cfg(x, t, y, 4.0)
        want = models["pre_ref"].forward_with_cfg(x, t, y, 4.0)
    assert rel_err(out, want) <= RTOL


def test_label_dropout_only_in_train_mode(models):
    # eval mode: no RNG use (docs/upstream_sampling.md, trap 13)
    state = torch.get_rng_state()
    with torch.no_grad():
        models["ft_ref"](latents(2), torch.tensor([5, 5]), torch.tensor([1, 2]))
        models["ft"](latents(2), torch.tensor([5, 5]), torch.tensor([1, 2]))
    assert torch.equal(state, torch.get_rng_state())


# ==============================================================================================
# (2) guided DDPM sampling vs the two-pass reference loop, incl. RNG consumption
# ==============================================================================================

def reference_dog(models, z, y, scale, steps, *, sampler="ddpm", eta=0.0, channels=3):
    n = len(z)
    fn = dog_guidance_fn(models["ft_ref"], models["pre_ref"], null=NULL, channels=channels)
    kwargs = dict(y=torch.cat([y, torch.full((n,), FT_CFG["num_classes"])]), cfg_scale=scale)
    diffusion = ReferenceDiffusion(steps)
    shape = (2 * n, *z.shape[1:])
    if sampler == "ddim":
        out = diffusion.ddim_sample_loop(fn, shape, torch.cat([z, z]), clip_denoised=False, model_kwargs=kwargs,
                                         device=z.device, eta=eta)
    else:
        out = diffusion.p_sample_loop(fn, shape, torch.cat([z, z]), clip_denoised=False, model_kwargs=kwargs,
                                      device=z.device)
    assert out.shape == shape
    return out[:n]


@pytest.mark.parametrize("steps,backend,scale", [("50", "torch", 1.5), ("25", "auto", 1.5), ("25", "torch", 4.0)])
def test_dog_sample_matches_reference_loop(models, steps, backend, scale):
    n = 3
    z, y = latents(n, 6), torch.tensor([0, 9, 4])
    z_before = z.clone()
    torch.manual_seed(1234)
    got = dgfast.sample(models["ft"], models["pre"], z, y, guidance_scale=scale, steps=steps, guidance_channels=3,
                        null_label=NULL, noise="reference", backend=backend)
    state_fast = torch.get_rng_state()
    torch.manual_seed(1234)
    want = reference_dog(models, z, y, scale, steps)
    state_ref = torch.get_rng_state()
    assert got.shape == z.shape and got.dtype == torch.float32
    assert torch.isfinite(want).all()
    assert rel_err(got, want) <= RTOL
    assert torch.equal(state_fast, state_ref), "dgfast.sample must consume the default generator as the reference"
    assert torch.equal(z, z_before), "z must not be modified in place"


# ==============================================================================================
# (3) DDIM
# ==============================================================================================

@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dog_ddim_matches_reference_loop(models, eta):
    n = 3
    z, y = latents(n, 7), torch.tensor([2, 2, 8])
    torch.manual_seed(99)
    got = dgfast.sample(models["ft"], models["pre"], z, y, guidance_scale=1.5, steps="ddim10", sampler="ddim",
                        eta=eta, null_label=NULL)
    state_fast = torch.get_rng_state()
    torch.manual_seed(99)
    want = reference_dog(models, z, y, 1.5, "ddim10", sampler="ddim", eta=eta)
    assert rel_err(got, want) <= RTOL
    assert torch.equal(state_fast, torch.get_rng_state()), "DDIM draws one noise tensor per step, even at eta=0"


# ==============================================================================================
# (4) guidance_scale == 1: the fine-tuned model alone
# ==============================================================================================

class Exploding(nn.Module):
    """A pretrained model that must never be called."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise AssertionError("pretrained model was called at guidance_scale=1")


def test_scale_one_is_plain_finetuned_sampling(models):
    n = 3
    z, y = latents(n, 8), torch.tensor([5, 0, 7])
    torch.manual_seed(5)
    got = dgfast.sample(models["ft"], Exploding().eval(), z, y, guidance_scale=1, steps="25")
    state_fast = torch.get_rng_state()
    torch.manual_seed(5)
    want = ReferenceDiffusion("25").p_sample_loop(models["ft_ref"].forward, z.shape, z, clip_denoised=False,
                                                  model_kwargs=dict(y=y), device=z.device)
    assert rel_err(got, want) <= RTOL
    assert torch.equal(state_fast, torch.get_rng_state()), "unguided sampling draws n rows per step"


def test_scale_one_accepts_no_pretrained(models):
    z, y = latents(2, 9), torch.tensor([1, 2])
    torch.manual_seed(0)
    a = dgfast.sample(models["ft"], None, z, y, guidance_scale=1.0, steps="ddim10")
    torch.manual_seed(0)
    b = dgfast.sample(models["ft"], Exploding().eval(), z, y, guidance_scale=1.0, steps="ddim10")
    assert torch.equal(a, b)


# ==============================================================================================
# (5) identical models guiding every channel == plain sampling, at any scale
# ==============================================================================================

@pytest.fixture(scope="module")
def label_blind():
    """A model whose label table rows are all equal, so eps(x, t, y) == eps(x, t, null) exactly."""
    fast, ref = make_pair(PRE_CFG, 11)
    with torch.no_grad():
        for m in (fast, ref):
            table = m.y_embedder.embedding_table.weight
            table.copy_(table[:1].expand_as(table))
    return fast, ref


def test_identical_models_all_channels_equal_plain_sampling(label_blind):
    fast, ref = label_blind
    n = 3
    z, y = latents(n, 10), torch.tensor([3, 1, 4])
    # per-sample noise: guided and unguided runs see the same noise
    guided = dgfast.sample(fast, fast, z, y, guidance_scale=2.5, steps="25", guidance_channels="all",
                           noise="per-sample", seeds=[1, 2, 3])
    plain = dgfast.sample(fast, None, z, y, guidance_scale=1, steps="25", noise="per-sample", seeds=[1, 2, 3])
    assert rel_err(guided, plain) <= RTOL
    # reference noise: the guided loop draws 2n rows per step, i.e. plain sampling of the doubled batch
    torch.manual_seed(3)
    guided = dgfast.sample(fast, fast, z, y, guidance_scale=2.5, steps="25", guidance_channels="all")
    torch.manual_seed(3)
    plain = ReferenceDiffusion("25").p_sample_loop(ref.forward, (2 * n, 4, 8, 8), torch.cat([z, z]),
                                                   clip_denoised=False, model_kwargs=dict(y=torch.cat([y, y])),
                                                   device=z.device)[:n]
    assert rel_err(guided, plain) <= RTOL


# ==============================================================================================
# (6) dog_forward == the DoG script's closure
# ==============================================================================================

@pytest.mark.parametrize("channels", [3, "all"])
def test_dog_forward_matches_closure(models, channels):
    n = 3
    x = latents(2 * n, 12)  # second half differs from the first: both must ignore it
    t = torch.full((2 * n,), 613)
    y = torch.cat([torch.tensor([7, 0, 3]), torch.full((n,), FT_CFG["num_classes"])])
    fast = dgfast.dog_forward(models["ft"], models["pre"], null_label=NULL, guidance_channels=channels)
    ref = dog_guidance_fn(models["ft_ref"], models["pre_ref"], null=NULL, channels=channels)
    with torch.no_grad():
        got, want = fast(x, t, y, 1.5), ref(x, t, y, 1.5)
    assert got.shape == want.shape == (2 * n, 8, 8, 8)
    assert rel_err(got, want) <= RTOL
    # rows [n:] carry the pre-trained variance channels, which differ from the fine-tuned ones
    assert not torch.allclose(got[:n, 4:], got[n:, 4:])
    x2 = torch.cat([x[:n], latents(n, 13)])
    with torch.no_grad():
        assert torch.equal(fast(x2, t, y, 1.5), got)


# ==============================================================================================
# (7) the sampler step, bitwise, with a synthetic elementwise model
# ==============================================================================================

class Synthetic:
    """A deterministic stand-in model: 2C output channels, each an elementwise function of x, t and y.
    Row i of the output depends only on row i of the input, so batching cannot change its bits."""

    def __init__(self, seed, C=4):
        g = torch.Generator().manual_seed(seed)
        self.a = (torch.rand(2 * C, generator=g) + 0.5).view(1, -1, 1, 1)
        self.b = torch.randn(2 * C, generator=g).view(1, -1, 1, 1)
        self.c = torch.randn(2 * C, generator=g).view(1, -1, 1, 1)
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        xx = torch.cat([x, x], dim=1)
        tt = t.float().view(-1, 1, 1, 1) / 1000
        yy = y.float().view(-1, 1, 1, 1) / 100
        return torch.tanh(xx * self.a + tt * self.b + yy * self.c)


def numpy_exp(t):
    return torch.from_numpy(np.exp(t.detach().cpu().numpy())).to(t.device)


def reference_exp(backend, device):
    """Under the Triton interpreter the kernel's exp is numpy's float32 exp (ulps away from torch's
    SLEEF expf on the CPU; on CUDA both are __nv_expf). To compare the rest of the step bitwise, the
    reference then runs with that same exp (tests/test_op_guided_step.py shows exp is the only difference)."""
    if backend == "triton" and device.type == "cpu":
        return mock.patch.object(torch, "exp", numpy_exp)
    return contextlib.nullcontext()


def reference_synthetic(ft, pre, z, y, scale, steps, sampler, eta=0.0, channels=3):
    n = len(z)
    fn = dog_guidance_fn(ft, pre, null=NULL, channels=channels)
    kwargs = dict(y=torch.cat([y, torch.full((n,), 10)]), cfg_scale=scale)
    d = ReferenceDiffusion(steps)
    loop = d.ddim_sample_loop if sampler == "ddim" else d.p_sample_loop
    extra = dict(eta=eta) if sampler == "ddim" else {}
    return loop(fn, (2 * n, *z.shape[1:]), torch.cat([z, z]), clip_denoised=False, model_kwargs=kwargs,
                device=z.device, **extra)[:n]


@pytest.mark.parametrize("backend", backends_available())
@pytest.mark.parametrize("sampler,steps,eta,channels,scale", [
    ("ddpm", "50", 0.0, 3, 1.5),
    ("ddpm", "25", 0.0, "all", 4.0),
    ("ddim", "ddim10", 0.0, 3, 1.5),
    ("ddim", "ddim10", 1.0, 3, 1.5),
])
def test_sampler_step_bitwise(backend, sampler, steps, eta, channels, scale):
    ft, pre = Synthetic(1), Synthetic(2)
    n = 3
    z, y = latents(n, 14), torch.tensor([4, 9, 0])
    torch.manual_seed(42)
    got = dgfast.sample(ft, pre, z, y, guidance_scale=scale, steps=steps, sampler=sampler, eta=eta,
                        guidance_channels=channels, null_label=NULL, backend=backend)
    state_fast = torch.get_rng_state()
    torch.manual_seed(42)
    with reference_exp(backend, z.device):
        want = reference_synthetic(ft, pre, z, y, scale, steps, sampler, eta, channels)
    assert torch.isfinite(want).all() and want.abs().max() > 0.1
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"
    assert torch.equal(state_fast, torch.get_rng_state())


@pytest.mark.parametrize("backend", backends_available())
def test_sampler_step_bitwise_unguided(backend):
    ft = Synthetic(3)
    z, y = latents(3, 15), torch.tensor([1, 2, 3])
    torch.manual_seed(8)
    got = dgfast.sample(ft, None, z, y, guidance_scale=1.0, steps="25", backend=backend)
    torch.manual_seed(8)
    with reference_exp(backend, z.device):
        want = ReferenceDiffusion("25").p_sample_loop(ft, z.shape, z, clip_denoised=False,
                                                      model_kwargs=dict(y=y), device=z.device)
    assert torch.equal(got, want)


def test_clip_denoised_bitwise():
    ft, pre = Synthetic(4), Synthetic(5)
    z, y = latents(2, 16) * 3, torch.tensor([1, 2])
    torch.manual_seed(2)
    got = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="25", clip_denoised=True, backend="torch")
    torch.manual_seed(2)
    n = 2
    want = ReferenceDiffusion("25").p_sample_loop(
        dog_guidance_fn(ft, pre), (2 * n, 4, 8, 8), torch.cat([z, z]), clip_denoised=True,
        model_kwargs=dict(y=torch.cat([y, torch.full((n,), 10)]), cfg_scale=1.5), device=z.device)[:n]
    assert torch.equal(got, want)


def test_model_sees_original_timesteps():
    seen = []

    def ft(x, t, y):
        seen.append(int(t[0]))
        return torch.zeros(len(x), 8, *x.shape[2:])

    dgfast.sample(ft, None, latents(1), torch.tensor([0]), guidance_scale=1, steps="25", backend="torch")
    assert seen == ReferenceDiffusion("25").timestep_map[::-1]
    assert seen[:2] == [999, 957] and seen[-1] == 0


# ==============================================================================================
# (8) per-sample noise
# ==============================================================================================

def test_per_sample_noise_is_batch_independent(models):
    seeds = [101, 202, 303, 404]
    y = torch.tensor([1, 5, 9, 2])
    kw = dict(guidance_scale=1.5, steps="25", noise="per-sample", null_label=NULL)
    state = torch.get_rng_state()
    full = dgfast.sample(models["ft"], models["pre"], None, y, seeds=seeds, **kw)
    assert torch.equal(state, torch.get_rng_state()), "per-sample noise must not touch the default generator"
    one = dgfast.sample(models["ft"], models["pre"], None, y[2:3], seeds=seeds[2:3], **kw)
    assert rel_err(one[0], full[2]) <= RTOL
    order = [3, 1, 0, 2]
    perm = dgfast.sample(models["ft"], models["pre"], None, y[order], seeds=[seeds[i] for i in order], **kw)
    assert rel_err(perm, full[order]) <= RTOL
    # with explicit latents the step noise still follows the seeds
    z = latents(4, 17)
    a = dgfast.sample(models["ft"], models["pre"], z, y, seeds=seeds, **kw)
    b = dgfast.sample(models["ft"], models["pre"], z[order], y[order], seeds=[seeds[i] for i in order], **kw)
    assert rel_err(b, a[order]) <= RTOL


# ==============================================================================================
# (9) input validation
# ==============================================================================================

def _call(models, **over):
    z, y = latents(2, 18), torch.tensor([1, 2])
    args = dict(finetuned=models["ft"], pretrained=models["pre"], z=z, y=y, guidance_scale=1.5, steps="ddim10",
                null_label=NULL)
    args.update(over)
    ft, pre, z, y = args.pop("finetuned"), args.pop("pretrained"), args.pop("z"), args.pop("y")
    return dgfast.sample(ft, pre, z, y, **args)


def _nan_z():
    z = latents(2, 18)
    z[1, 2, 3, 4] = float("nan")
    return z


ERROR_CASES = [
    # (argument named in the message, overrides)
    ("z", dict(z=latents(2, 18)[0])),                      # 3-D
    ("z", dict(z=latents(2, 18)[:, :3])),                  # wrong channel count
    ("z", dict(z=latents(2, 18, size=16))),                # wrong latent size
    ("z", dict(z=latents(2, 18).to(torch.int64))),         # wrong dtype
    ("z", dict(z=latents(2, 18).double())),                # float64: not a sampling dtype
    ("z", dict(z=_nan_z())),
    ("z", dict(z=torch.full((2, 4, 8, 8), float("inf")))),
    ("z", dict(z=[[0.0]])),                                 # not a tensor
    ("y", dict(y=torch.tensor([1, 2], dtype=torch.int32))),
    ("y", dict(y=torch.tensor([1.0, 2.0]))),
    ("y", dict(y=torch.tensor([1, 2, 3]))),                # length
    ("y", dict(y=torch.tensor([[1], [2]]))),               # 2-D
    ("y", dict(y=torch.tensor([1, 11]))),                  # beyond the 11-row fine-tuned table
    ("y", dict(y=torch.tensor([-1, 2]))),
    ("y", dict(y=torch.tensor([1, 2], device="meta"))),    # device
    ("y", dict(y=[1, 2])),
    ("null_label", dict(null_label=1001)),
    ("null_label", dict(null_label=-1)),
    ("null_label", dict(null_label=1.5)),
    ("guidance_scale", dict(guidance_scale=-0.5)),
    ("guidance_scale", dict(guidance_scale=float("nan"))),
    ("guidance_scale", dict(guidance_scale=float("inf"))),
    ("guidance_scale", dict(guidance_scale="1.5")),
    ("steps", dict(steps="ddim300")),
    ("steps", dict(steps="abc")),
    ("steps", dict(steps=0)),
    ("steps", dict(steps="0")),
    ("sampler", dict(sampler="euler")),
    ("noise", dict(noise="gaussian")),
    ("seeds", dict(noise="per-sample")),
    ("seeds", dict(noise="per-sample", seeds=[1, 2, 3])),
    ("seeds", dict(seeds=[1, 2])),                         # seeds with reference noise
    ("eta", dict(eta=-1.0)),
    ("eta", dict(eta=float("nan"))),
    ("backend", dict(backend="cuda")),
    ("guidance_channels", dict(guidance_channels=5)),
    ("guidance_channels", dict(guidance_channels="some")),
    ("pretrained", dict(pretrained=None)),
    ("null_label", dict(null_label=10.0)),                 # a float, not "outside the table"
    ("seeds", dict(noise="per-sample", seeds=5)),
    ("seeds", dict(noise="per-sample", seeds=["a", "b"])),
    ("seeds", dict(noise="per-sample", seeds=[1.7, 2.2])),  # not silently truncated
    ("seeds", dict(noise="per-sample", seeds=[2 ** 70, 2])),
    ("seeds", dict(noise="per-sample", seeds=[1], z=None)),  # one seed, two labels: names seeds, not z
    ("paired", dict(paired="yes")),
    ("paired", dict(paired=None)),
    ("eta", dict(eta=True)),
    ("eta", dict(eta=1.5, sampler="ddim")),                 # DDIM's step would be NaN
]


@pytest.mark.parametrize("name,over", ERROR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_sample_rejects_bad_input(models, name, over):
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        _call(models, **over)


def test_sample_accepts_numpy_labels_and_seeds(models):
    np_null = _call(models, null_label=np.int64(NULL), steps=np.int64(3), guidance_scale=np.float32(1.5))
    torch.manual_seed(0)
    t_null = _call(models, null_label=torch.tensor(NULL), steps="ddim3", guidance_scale=torch.tensor(1.5))
    torch.manual_seed(0)
    assert torch.equal(t_null, _call(models, steps="ddim3"))  # 0-dim tensors are their numbers
    _call(models, noise="per-sample", seeds=[0, 2 ** 32 - 1], steps="ddim3")  # the 32 bits every generator keeps
    a = _call(models, noise="per-sample", seeds=np.array([3, 4]), steps="ddim3")
    b = _call(models, noise="per-sample", seeds=[3, 4], steps="ddim3")
    assert torch.equal(a, b) and np_null.shape == (2, 4, 8, 8)


def test_sample_with_no_rows_returns_no_samples(models):
    out = _call(models, z=torch.empty(0, 4, 8, 8), y=torch.empty(0, dtype=torch.int64))
    assert out.shape == (0, 4, 8, 8) and out.dtype == torch.float32


def test_sample_warns_about_nonfinite_samples(models):
    def broken(x, t, y):  # a model that diverges on sample 1
        out = models["ft"](x, t, y)
        out[1] = float("nan")
        return out
    with pytest.warns(RuntimeWarning, match="1 of 2 samples contain NaN"):
        out = dgfast.sample(broken, None, latents(2, 3), torch.tensor([1, 2]), guidance_scale=1, steps="ddim3")
    assert torch.isfinite(out[0]).all()


def test_models_of_other_dtypes_run_as_two_forwards(models):
    """A bf16 fine-tune guided by a float32 ancestor cannot share one batch; it runs unpaired."""
    import copy
    ft16 = copy.deepcopy(models["ft"]).bfloat16()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="two forwards.*bfloat16 vs torch.float32"):
        got = _call(models, finetuned=ft16, steps="ddim3")
    torch.manual_seed(0)
    want = _call(models, finetuned=ft16, steps="ddim3", paired=False)
    assert torch.equal(got, want)


def test_dog_forward_checks_its_arguments(models):
    with pytest.raises(ValueError, match=r"\bnull_label\b"):
        dgfast.dog_forward(models["ft"], models["pre"], null_label=1001)
    fn = dgfast.dog_forward(models["ft"], models["pre"], null_label=NULL)
    x, t = latents(4, 19), torch.full((4,), 10)
    with pytest.raises(ValueError, match="2n rows"):
        fn(x[:3], t[:3], torch.tensor([1, 2, 10]), 1.5)
    with pytest.raises(ValueError, match=r"label table"):
        fn(x, t, torch.tensor([1, 11, 10, 10]), 1.5)
    with pytest.raises(ValueError, match=r"\bguidance_scale\b"):
        fn(x, t, torch.tensor([1, 2, 10, 10]), float("nan"))


def test_zoo_is_reachable_as_the_readme_writes_it():
    import subprocess
    import sys
    code = "import dgfast; print(dgfast.zoo.load_pair.__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "load_pair" in res.stdout, res.stderr[-2000:]


def test_sample_rejects_models_on_other_device(models):
    ft_meta = dgfast.DiT(**FT_CFG).to("meta").eval()
    with pytest.raises(ValueError, match=r"\bz\b"):
        _call(models, finetuned=ft_meta, guidance_scale=1.0)


def test_sample_rejects_meta_z(models):
    # a meta z holds no values to check for NaN: the error must still be a clear one naming z
    with pytest.raises(ValueError, match=r"\bz\b.*meta"):
        _call(models, z=torch.empty(2, 4, 8, 8, device="meta"))


@pytest.mark.parametrize("which", ["finetuned", "pretrained"])
def test_sample_rejects_train_mode(which):
    ft, _ = make_pair(FT_CFG, 1)
    pre, _ = make_pair(PRE_CFG, 2)
    {"finetuned": ft, "pretrained": pre}[which].train()
    with pytest.raises(ValueError, match=rf"\b{which}\b.*train mode"):
        _call(dict(ft=ft, pre=pre))
    with pytest.raises(ValueError, match=rf"\b{which}\b.*train mode"):
        dgfast.dog_forward(ft, pre)


@pytest.mark.parametrize("key,cfg", [
    ("input_size", dict(PRE_CFG, input_size=16)),
    ("in_channels", dict(PRE_CFG, in_channels=3)),
    ("out_channels|learn_sigma", dict(PRE_CFG, learn_sigma=False)),
])
def test_sample_rejects_mismatched_models(models, key, cfg):
    pre = dgfast.DiT(**cfg).eval()
    with pytest.raises(ValueError, match=rf"finetuned and pretrained.*({key})"):
        _call(models, pretrained=pre)
    with pytest.raises(ValueError, match=rf"finetuned and pretrained.*({key})"):
        dgfast.dog_forward(models["ft"], pre)


def test_dog_forward_rejects_bad_channels(models):
    fn = dgfast.dog_forward(models["ft"], models["pre"], guidance_channels=9)
    x = latents(4, 19)
    with pytest.raises(ValueError, match=r"\bguidance_channels\b"):
        fn(x, torch.full((4,), 10), torch.tensor([1, 2, 10, 10]), 1.5)


def test_model_returning_wrong_shape_is_named():
    def ft(x, t, y):
        return torch.zeros(len(x), 4, *x.shape[2:])  # eps only, no variance channels
    with pytest.raises(ValueError, match=r"\bfinetuned\b"):
        dgfast.sample(ft, None, latents(1), torch.tensor([0]), guidance_scale=1, steps="ddim10")


# ==============================================================================================
# Checkpoints and the upstream state_dict layout
# ==============================================================================================

def _shifted(sd, delta):
    return {k: v + delta for k, v in sd.items()}


def test_load_train_checkpoint_takes_ema_with_warning(tmp_path, models):
    sd = models["ft"].state_dict()
    path = tmp_path / "0024000.pt"
    torch.save({"model": _shifted(sd, 1.0), "ema": sd, "opt": {"state": {}},
                "args": argparse.Namespace(model="DiT-XL/2", num_classes=10)}, path)
    with pytest.warns(UserWarning, match="weights_only"):
        got = dgfast.load_checkpoint(path)
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    fresh = dgfast.DiT(**FT_CFG)
    fresh.load_state_dict(got, strict=True)


def test_load_plain_state_dict(tmp_path, models):
    sd = models["pre"].state_dict()
    path = tmp_path / "pre.pt"
    torch.save(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain state_dict loads with weights_only=True, no warning
        got = dgfast.load_checkpoint(str(path))
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_safetensors_round_trip(tmp_path, models):
    sd = models["ft"].state_dict()
    path = tmp_path / "ft.safetensors"
    dgfast.save_safetensors(sd, path)
    got = dgfast.load_checkpoint(path)
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        dgfast.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        dgfast.load_checkpoint(os.fspath(tmp_path / "nope.safetensors"))


def test_upstream_state_dict_loads_strict():
    cfg = dict(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=3, num_classes=10)
    ref = randomize(ReferenceDiT(**cfg), 21)
    sd = ref.state_dict()
    # upstream keys from docs/upstream_sampling.md §1.2, no LayerNorm or timm extras
    assert "pos_embed" in sd and sd["pos_embed"].shape == (1, 16, 48)
    assert sd["blocks.1.attn.qkv.weight"].shape == (144, 48)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 48)
    assert sd["y_embedder.embedding_table.weight"].shape == (11, 48)
    assert not any("norm" in k for k in sd)
    fast = dgfast.DiT(**cfg)
    fast.load_state_dict(sd, strict=True)
    assert torch.equal(fast.pos_embed, sd["pos_embed"])  # the loaded table, not the analytic one
    assert sorted(fast.state_dict()) == sorted(sd)


def test_pos_embed_init_matches_upstream():
    fast, ref = dgfast.DiT(**FT_CFG), ReferenceDiT(**FT_CFG)
    assert torch.equal(fast.pos_embed, ref.pos_embed)


UPSTREAM_PARAMS = {
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
}


def test_model_zoo_names_and_param_counts():
    assert set(dgfast.DiT_models) == set(UPSTREAM_PARAMS) == set(ReferenceDiT_models)
    with torch.device("meta"):  # no memory: XL/2 would be 2.7 GB in fp32
        for name, count in UPSTREAM_PARAMS.items():
            fast = dgfast.DiT_models[name](input_size=32, num_classes=1000)
            assert sum(p.numel() for p in fast.parameters()) == count, name
            ref = ReferenceDiT_models[name](input_size=32, num_classes=1000)
            assert sum(p.numel() for p in ref.parameters()) == count, name
            assert {k: v.shape for k, v in fast.state_dict().items()} == \
                   {k: v.shape for k, v in ref.state_dict().items()}, name


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="DiT-XL/3"):
        dgfast.build_model("DiT-XL/3")


def test_reference_timestep_frequencies_trap():
    # DiT's /128 frequencies, computed in float32 on the CPU (not diffusers' /127)
    from dgfast.reference import TimestepEmbedder
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([999]), 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    assert torch.equal(emb[0, :128], torch.cos(999 * freqs))
    assert torch.equal(emb[0, 128:], torch.sin(999 * freqs))


# ----------------------------------------------------------------------------------------------
# Half-precision models: the models run in their weights' dtype, the sampler in the latents'
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_models(models, dtype, tol):
    """bf16/fp16 weights with float32 latents: each forward (alone and paired) within the half
    type's rounding of the float32 forward, and sample() returns float32 latents. (Before the
    inputs were cast to the weights' dtype this raised a dtype-mismatch RuntimeError.)"""
    import copy
    from dgfast.pair_cache import get_pair
    ft, pre = models["ft"], models["pre"]
    ft_h, pre_h = copy.deepcopy(ft).to(dtype), copy.deepcopy(pre).to(dtype)
    x = latents(3, seed=5)
    t = torch.tensor([3, 500, 999])
    y = torch.tensor([1, 4, 9])
    want_ft, want_pre = ft(x, t, y), pre(x, t, torch.full_like(y, NULL))
    assert rel_err(ft_h(x, t, y).float(), want_ft) < tol
    with torch.inference_mode():
        got_ft, got_pre = get_pair(ft_h, pre_h).forward_pair(x, t, y, NULL)
    assert got_ft.dtype == dtype
    assert rel_err(got_ft.float(), want_ft) < tol and rel_err(got_pre.float(), want_pre) < tol
    z = latents(3, seed=6)
    out = dgfast.sample(ft_h, pre_h, z, y, guidance_scale=1.5, steps="ddim4", sampler="ddim", null_label=NULL)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    full = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="ddim4", sampler="ddim", null_label=NULL)
    assert not torch.equal(out, full) and rel_err(out, full) < 20 * tol


def test_attention_choice_is_checked():
    m = dgfast.DiT(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="attention must be one of"):
        m.set_attention("flash")
    try:
        import xformers
        usable = bool(getattr(xformers, "_has_cpp_library", False))
    except ImportError:
        usable = False
    if usable:
        assert m.set_attention("xformers") is m and m.blocks[0].attn.impl == "xformers"
    else:  # said when chosen, not at the first CUDA forward
        with pytest.raises(RuntimeError, match="xformers"):
            m.set_attention("xformers")
        assert m.blocks[0].attn.impl == "sdpa"
