"""Conversion on the user's path (dgfast.convert): upstream-layout and diffusers DiT modules given to
dgfast.sample / dog_forward / DoGDiTPipeline run as dgfast's fused, paired DiT on their own tensors;
exact=True keeps them as given (bit-identical to the upstream loop); backend= reaches the model
forwards; compile= torch.compiles the paired forward once.

dgfast.reference.ReferenceDiT stands in for DiT's models.py (timm cannot be installed here).
"""
import logging
import os
from unittest import mock

import pytest
import torch
import torch.nn as nn

import dgfast
from dgfast import convert, ops, pair_cache
from dgfast.paired import PairedDiT
from dgfast.reference import ReferenceDiffusion, ReferenceDiT, dog_guidance_fn

CFG = dict(input_size=8, patch_size=4, hidden_size=48, depth=2, num_heads=3)
NULL = 1000
TOL = 1e-4  # converted vs upstream, whole sampling loop (measured ~4e-7)


def randomize(m, seed, std=0.05):
    """Every parameter random and non-zero (upstream zero-inits adaLN and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def upstream_pair(seed=0):
    return randomize(ReferenceDiT(**CFG, num_classes=10), seed + 1), randomize(ReferenceDiT(**CFG, num_classes=1000),
                                                                               seed + 2)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def latents(n=3, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def reference_dog(ft, pre, z, y, scale, steps):
    """The DoG script's loop: dog_guidance_fn over p_sample_loop on the doubled batch."""
    n = len(z)
    fn = dog_guidance_fn(ft, pre, null=NULL, channels=3)
    kwargs = dict(y=torch.cat([y, torch.full((n,), 10)]), cfg_scale=scale)
    return ReferenceDiffusion(steps).p_sample_loop(fn, (2 * n, *z.shape[1:]), torch.cat([z, z]), clip_denoised=False,
                                                   model_kwargs=kwargs, device=z.device)[:n]


def seeded(fn, seed=7):
    """fn() after torch.manual_seed(seed), and the generator state it leaves."""
    torch.manual_seed(seed)
    out = fn()
    return out, torch.get_rng_state()


class CallCount:
    """Counts calls of a method on a class, calling through."""

    def __init__(self, cls, name):
        self.n, orig = 0, getattr(cls, name)

        def counted(obj, *args, **kwargs):
            self.n += 1
            return orig(obj, *args, **kwargs)
        self.patch = mock.patch.object(cls, name, counted)

    def __enter__(self):
        self.patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self.patch.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# exact=True vs the default conversion
# ----------------------------------------------------------------------------------------------

def test_exact_is_bit_identical_to_the_upstream_loop():
    ft, pre = upstream_pair()
    z, y = latents(), torch.tensor([0, 9, 4])
    want, rng_ref = seeded(lambda: reference_dog(ft, pre, z, y, 1.5, "25"))
    got, rng = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="25", exact=True))
    assert torch.equal(got, want)
    assert torch.equal(rng, rng_ref)


def test_default_converts_shares_and_runs_the_fused_pair():
    ft, pre = upstream_pair(10)
    z, y = latents(seed=1), torch.tensor([3, 1, 7])
    want, rng_ref = seeded(lambda: reference_dog(ft, pre, z, y, 1.5, "25"))
    with CallCount(ReferenceDiT, "forward") as src_calls, CallCount(PairedDiT, "forward_pair") as pair_calls:
        got, rng = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="25"))
    assert rel(got, want) <= TOL and not torch.equal(got, want)  # not the models as given: the fused forward
    assert torch.equal(rng, rng_ref), "conversion (and its probe) must not touch the default generator"
    assert pair_calls.n == 25 and src_calls.n == 2  # one probe forward per source model, then the pair only
    cft, cpre = convert.dgfast_models(ft, pre)
    assert isinstance(cft, dgfast.DiT) and isinstance(cpre, dgfast.DiT)
    assert pair_cache.cache_entry(cft, cpre) is not None
    for src, conv in ((ft, cft), (pre, cpre)):  # the upstream layout shares every tensor
        assert [p.data_ptr() for p in src.parameters()] == [p.data_ptr() for p in conv.parameters()]
        assert not conv.conversion.copied and len(conv.conversion.shared) == len(src.state_dict())
    text = dgfast.conversion_report(ft, pre)
    assert text.count("ReferenceDiT: 32 tensors shared with it") == 2 and "0 copied" in text


def test_conversion_is_cached_and_rebuilt_when_a_weight_changes():
    ft, pre = upstream_pair(20)
    z, y = latents(seed=2), torch.tensor([5, 5, 2])
    first = convert.dgfast_models(ft, pre)
    assert all(a is b for a, b in zip(first, convert.dgfast_models(ft, pre)))  # cached per source pair
    with torch.no_grad():
        pre.blocks[1].mlp.fc2.weight.data.mul_(1.5)  # a .data edit: no version counter moves
    again = convert.dgfast_models(ft, pre)
    assert again[1] is not first[1]
    want, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=2.0, steps="10", exact=True))
    got, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=2.0, steps="10"))
    assert rel(got, want) <= TOL


def test_a_model_guiding_itself_is_converted_once():
    """DiT's classic CFG through the DoG path (what `dgfast sample` does without --pretrained-ckpt)."""
    _, pre = upstream_pair(25)
    z, y = latents(seed=2), torch.tensor([5, 999, 2])
    cft, cpre = convert.dgfast_models(pre, pre)
    assert cft is cpre and cft is not None
    want, _ = seeded(lambda: dgfast.sample(pre, pre, z, y, guidance_scale=2.0, steps="5", exact=True))
    got, _ = seeded(lambda: dgfast.sample(pre, pre, z, y, guidance_scale=2.0, steps="5"))
    assert rel(got, want) <= TOL and pair_cache.cache_entry(cft, cft) is not None


def test_unguided_and_cfg_run_the_converted_model():
    """guidance_scale 1 and mode='cfg' (no cfg_null_label: upstream keeps num_classes on y_embedder)."""
    ft, _ = upstream_pair(30)
    z, y = latents(seed=3), torch.tensor([1, 2, 3])
    with CallCount(ReferenceDiT, "forward") as src_calls:
        plain, _ = seeded(lambda: dgfast.sample(ft, None, z, y, guidance_scale=1, steps="10"))
        cfg, rng = seeded(lambda: dgfast.sample(ft, None, z, y, guidance_scale=4.0, steps="10", mode="cfg"))
    assert src_calls.n == 1  # the probe; every step ran the converted model
    plain_ref, _ = seeded(lambda: ReferenceDiffusion("10").p_sample_loop(
        ft.forward, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y), device=z.device))
    assert rel(plain, plain_ref) <= TOL
    # DiT's sample.py: forward_with_cfg over the doubled batch, labels [y; 10] (the model's null row)
    kwargs = dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=4.0)
    cfg_ref, rng_ref = seeded(lambda: ReferenceDiffusion("10").p_sample_loop(
        ft.forward_with_cfg, (6, 4, 8, 8), torch.cat([z, z]), clip_denoised=False, model_kwargs=kwargs,
        device=z.device)[:3])
    assert rel(cfg, cfg_ref) <= TOL and torch.equal(rng, rng_ref)
    exact, _ = seeded(lambda: dgfast.sample(ft, None, z, y, guidance_scale=4.0, steps="10", mode="cfg", exact=True))
    assert torch.equal(exact, cfg_ref)


def test_dog_forward_converts_and_exact_is_the_closure():
    ft, pre = upstream_pair(40)
    n = 3
    x = latents(2 * n, seed=4)
    t = torch.full((2 * n,), 613)
    y = torch.cat([torch.tensor([7, 0, 3]), torch.full((n,), 10)])
    with torch.no_grad():
        want = dog_guidance_fn(ft, pre, null=NULL)(x, t, y, 1.5)
        assert torch.equal(dgfast.dog_forward(ft, pre, null_label=NULL, exact=True)(x, t, y, 1.5), want)
        with CallCount(PairedDiT, "forward_pair") as pair_calls:
            got = dgfast.dog_forward(ft, pre, null_label=NULL)(x, t, y, 1.5)
    assert pair_calls.n == 1 and rel(got, want) <= TOL


# ----------------------------------------------------------------------------------------------
# What is not converted runs as given
# ----------------------------------------------------------------------------------------------

class ScaledDiT(ReferenceDiT):
    """Upstream's state_dict, another forward (as SiT's backbone has): conversion must refuse it."""

    def forward(self, x, t, y):
        return super().forward(x, t, y) * 0.5


def test_a_module_with_another_forward_runs_as_given_with_one_log_line(caplog):
    ft = randomize(ScaledDiT(**CFG, num_classes=10), 50)
    _, pre = upstream_pair(50)
    z, y = latents(seed=5), torch.tensor([0, 1, 2])
    with caplog.at_level(logging.INFO, logger="dgfast"):
        got, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="10"))
        seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="10"))
    lines = [r for r in caplog.records if r.name == "dgfast"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "finetuned model" in lines[0].getMessage() and "differs from upstream DiT's" in lines[0].getMessage()
    want, _ = seeded(lambda: reference_dog(ft, pre, z, y, 1.5, "10"))
    assert rel(got, want) <= TOL  # the fine-tuned model as given, the pre-trained one converted
    assert convert.dgfast_models(ft, pre)[0] is None and "runs as given" in dgfast.conversion_report(ft, pre)


def test_hooked_and_foreign_modules_run_as_given(caplog):
    ft, pre = upstream_pair(60)
    calls = []
    handle = ft.register_forward_hook(lambda *a: calls.append(1))
    try:
        with caplog.at_level(logging.INFO, logger="dgfast"):
            dgfast.sample(ft, pre, latents(), torch.tensor([0, 1, 2]), guidance_scale=1.5, steps="5")
    finally:
        handle.remove()
    assert len(calls) == 5 and "forward hooks" in caplog.text
    assert convert.dgfast_models(ft, pre)[0] is not None  # hook gone: converted again

    class Twice(nn.Module):  # not a DiT at all
        def forward(self, x, t, y):
            return torch.cat([x, x], dim=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dgfast"):
        dgfast.sample(Twice().eval(), None, latents(), torch.tensor([0, 1, 2]), guidance_scale=1, steps="5")
    assert "neither upstream DiT's nor diffusers' DiT keys" in caplog.text


# ----------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel
# ----------------------------------------------------------------------------------------------

def diffusers_dit(seed, classes):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=4, num_embeds_ada_norm=classes)
    randomize(m, seed)
    emb0 = m.transformer_blocks[0].norm1.emb.state_dict()  # one embedder, as converted DiT weights have
    m.transformer_blocks[1].norm1.emb.load_state_dict(emb0)
    return m.eval()


@pytest.mark.filterwarnings("ignore:Accessing config attribute:FutureWarning")  # model_info on diffusers
def test_diffusers_modules_convert_in_sample_and_the_pipeline():
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from dgfast.diffusers_pipeline import DoGDiTPipeline
    ft, pre = diffusers_dit(1, 10), diffusers_dit(2, 1000)
    pipe = DoGDiTPipeline(ft, pre, None, DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(guidance_scale=2.0, num_inference_steps=6, output_type="latent")
    want = pipe([1, 7], generator=torch.Generator().manual_seed(3), exact=True, **kw).images
    with CallCount(DiTTransformer2DModel, "forward") as src_calls, \
            CallCount(PairedDiT, "forward_pair") as pair_calls:
        got = pipe([1, 7], generator=torch.Generator().manual_seed(3), **kw).images
        torch.manual_seed(3)
        z = torch.randn(2, 4, 8, 8)
        out = dgfast.sample(ft, pre, z, torch.tensor([1, 7]), guidance_scale=2.0, steps=6, guidance_channels="all",
                            scheduler=DDIMScheduler(clip_sample=False))
    assert src_calls.n == 2 and pair_calls.n == 12  # probes, then the pair for both callers
    assert rel(got, want) <= TOL and not torch.equal(got, want)
    assert rel(out, want) <= TOL
    conv = convert.dgfast_models(ft, pre)[0].conversion
    assert sorted(conv.copied) == [f"blocks.{i}.attn.qkv.{s}" for i in (0, 1) for s in ("bias", "weight")]
    with torch.no_grad():  # an edit of a copied tensor's source: the copy is rebuilt
        ft.transformer_blocks[0].attn1.to_q.weight.mul_(2.0)
    want = pipe([1, 7], generator=torch.Generator().manual_seed(3), exact=True, **kw).images
    got = pipe([1, 7], generator=torch.Generator().manual_seed(3), **kw).images
    assert rel(got, want) <= TOL


# ----------------------------------------------------------------------------------------------
# backend= reaches the forward; user settings survive
# ----------------------------------------------------------------------------------------------

class Boom:
    """The C++ extension with every fused op of the forward and the step raising. weights_digest
    (the pair cache's weight check, dgfast.pair_cache) computes nothing of the samples and runs
    under every backend."""
    def __getattr__(self, name):
        if name == "weights_digest":
            return _REAL_CPP.weights_digest
        raise AssertionError(f"a fused C++ op ({name}) ran")


_REAL_CPP = ops.cpp_extension()


@pytest.mark.skipif(ops.cpp_extension() is None, reason="the C++ ops are what backend='auto' would run")
@pytest.mark.parametrize("paired", [True, False])
def test_backend_torch_runs_no_fused_op_anywhere(paired):
    ft, pre = upstream_pair(70)
    z, y = latents(seed=7), torch.tensor([4, 4, 0])
    convert.dgfast_models(ft, pre)  # converted (probe on the default backend) before the fused ops go
    with mock.patch.object(ops, "cpp_extension", lambda: Boom()):
        dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="5", backend="torch", paired=paired)
        dgfast.sample(ft, None, z, y, guidance_scale=1, steps="5", backend="torch")
        with pytest.raises(AssertionError, match="fused C.. op"):  # the control: "auto" does run them
            dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="5", paired=paired)


def test_backend_is_restored_on_user_models():
    ft = randomize(dgfast.DiT(**CFG, num_classes=10), 80).set_backend("cpp")
    pre = randomize(dgfast.DiT(**CFG, num_classes=1000), 81)
    dgfast.sample(ft, pre, latents(), torch.tensor([1, 2, 3]), guidance_scale=1.5, steps="3", backend="torch",
                  paired=False)
    assert ft.backend == "cpp" and all(b.mlp.backend == "cpp" for b in ft.blocks)
    assert pre.backend == "auto" and all(b.mlp.backend == "auto" for b in pre.blocks)


# ----------------------------------------------------------------------------------------------
# compile=
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["fast", 1, None, "max_autotune"])
def test_bad_compile_values_name_compile(bad, tmp_path):
    ft, pre = upstream_pair()
    with pytest.raises(ValueError, match="compile"):
        dgfast.sample(ft, pre, latents(), torch.tensor([0, 1, 2]), steps="3", compile=bad)
    with pytest.raises(ValueError, match="compile"):
        dgfast.sample_to_dir(ft, pre, tmp_path / "s", num_samples=1, batch_size=1, num_classes=10, compile=bad)


def test_exact_refuses_what_would_change_its_bits():
    ft, pre = upstream_pair()
    z, y = latents(), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="exact=True"):
        dgfast.sample(ft, pre, z, y, steps="3", exact=True, compile=True)
    cft, cpre = convert.dgfast_models(ft, pre)
    with pytest.raises(ValueError, match="exact=True"):
        dgfast.sample(ft, pre, z, y, steps="3", exact=True, paired=dgfast.pair(cft, cpre))
    with pytest.raises(ValueError, match="exact=True"):
        dgfast.dog_forward(ft, pre, exact=True, paired=dgfast.pair(cft, cpre))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports
def test_compile_runs_the_paired_forward_compiled_once():
    """One inductor compile of a tiny pair (C++ codegen on CPU: the slow test of this file)."""
    from torch._dynamo.utils import counters
    ft, pre = upstream_pair(90)
    z, y = latents(seed=9), torch.tensor([2, 0, 1])
    want, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="6", exact=True))
    got, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="6", compile=True))
    graphs = counters["stats"]["unique_graphs"]
    again, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="6", compile=True))
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # the second call compiled nothing
    assert rel(got, want) <= TOL and torch.equal(again, got)
    pair = pair_cache.get_pair(*convert.dgfast_models(ft, pre))
    assert ("forward_pair", "default") in vars(pair)["_dgfast_compiled"]


# ----------------------------------------------------------------------------------------------
# dgfast sample --exact / --compile
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    for name, classes, seed in (("ft", 10, 1), ("pre", 1000, 2)):
        dgfast.save_safetensors(randomize(dgfast.DiT(**CFG, num_classes=classes), seed).state_dict(),
                                d / f"{name}.safetensors")
    (d / "arch.json").write_text('{"patch_size": 4, "hidden_size": 48, "depth": 2, "num_heads": 3}')
    return d


def cli_args(d, out, *extra):
    return ["sample", "--model-config", str(d / "arch.json"), "--ckpt", str(d / "ft.safetensors"),
            "--pretrained-ckpt", str(d / "pre.safetensors"), "--image-size", "64", "--num-classes", "10",
            "--num-sampling-steps", "5", "--sample-dir", str(out), "--no-progress", "--vae", "none",
            "--seed-mode", "reference", "--num-fid-samples", "3", "--per-proc-batch-size", "2", "--global-seed", "4",
            "--cfg-scale", "1.5", *extra]


def test_cli_exact_writes_the_dog_scripts_samples(ckpts, tmp_path):
    """sample_dog_ddp.py on one process, transcribed: its seeding, z / y draws and p_sample_loop over the
    doubled batch with the DoG closure, on upstream's module -- the files hold exactly those samples."""
    import numpy as np

    from dgfast import cli
    assert cli.main(cli_args(ckpts, tmp_path / "exact", "--exact")) == 0
    ft, pre = ReferenceDiT(**CFG, num_classes=10), ReferenceDiT(**CFG, num_classes=1000)
    ft.load_state_dict(dgfast.load_checkpoint(str(ckpts / "ft.safetensors")))
    pre.load_state_dict(dgfast.load_checkpoint(str(ckpts / "pre.safetensors")))
    ft.eval(), pre.eval()
    torch.manual_seed(4)  # global_seed * world_size + rank
    want = []
    for _ in range(2):  # ceil(3 / 2) iterations of 2
        z = torch.randn(2, 4, 8, 8)
        y = torch.randint(0, 10, (2,))
        want += list(reference_dog(ft, pre, z, y, 1.5, "5"))
    for i in range(3):
        assert np.array_equal(np.load(tmp_path / "exact" / f"{i:06d}.npy"), want[i].numpy()), i
    assert cli.main(cli_args(ckpts, tmp_path / "fused")) == 0  # the control: dgfast's own forward
    fused = torch.from_numpy(np.stack([np.load(tmp_path / "fused" / f"{i:06d}.npy") for i in range(3)]))
    assert rel(fused, torch.stack(want[:3])) <= TOL and not torch.equal(fused, torch.stack(want[:3]))


@pytest.mark.parametrize("extra,message", [(["--compile=fast"], "--compile 'fast'"),
                                           (["--exact", "--compile"], "--exact .* does not combine with --compile")])
def test_cli_bad_compile_is_a_usage_error(ckpts, tmp_path, capsys, extra, message):
    import re

    from dgfast import cli
    assert cli.main(cli_args(ckpts, tmp_path / "out", *extra)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_peft_lora_fine_tune_of_upstream_modules_pairs_as_lora():
    """peft LoRA on an upstream module: the converted DiT takes the LoRA layers over as they are, and the
    pair runs each base GEMM once for both models (the base is the pre-trained weights)."""
    peft = pytest.importorskip("peft")
    _, pre = upstream_pair(100)
    ft = ReferenceDiT(**CFG, num_classes=10)
    ft.load_state_dict({k: v for k, v in pre.state_dict().items() if "y_embedder" not in k}, strict=False)
    randomize(ft.y_embedder, 101)
    ft = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["qkv", "proj", "fc1", "fc2"]), ft).eval()
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(102))
    z, y = latents(seed=10), torch.tensor([9, 0, 5])
    want, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="5", exact=True))
    got, _ = seeded(lambda: dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="5"))
    assert rel(got, want) <= TOL
    cft, cpre = convert.dgfast_models(ft, pre)
    assert cft.blocks[0].attn.qkv is ft.blocks[0].attn.qkv  # the peft layer itself
    kinds = pair_cache.get_pair(cft, cpre).kinds()
    assert kinds["blocks.1.mlp.fc1"] == "lora" and kinds["x_embedder.proj"] == "lora"
    assert not cft.conversion.copied and any("lora_A" in k for k in cft.conversion.shared)


def test_to_dgfast_share_uses_the_given_tensors():
    from dgfast.adapters import to_dgfast
    src, _ = upstream_pair(110)
    x, t, y = latents(2, 11), torch.tensor([3, 999]), torch.tensor([1, 10])
    copy, shared_sd, shared = to_dgfast(src), to_dgfast(src.state_dict(), share=True, num_heads=3), \
        to_dgfast(src, share=True)
    assert not copy.conversion.shared and "32 copied" in str(copy.conversion)
    for m in (shared_sd, shared):
        assert not m.conversion.copied
        assert m.blocks[1].mlp.fc2.weight.data_ptr() == src.blocks[1].mlp.fc2.weight.data_ptr()
    assert shared.blocks[1].mlp.fc2 is src.blocks[1].mlp.fc2 and shared.pos_embed is src.pos_embed
    with torch.no_grad():
        want = src(x, t, y)
        for m in (copy, shared_sd, shared):
            assert rel(m(x, t, y), want) <= 1e-5
        src.blocks[0].attn.proj.weight.mul_(3.0)  # the shared conversions follow, the copy does not
        want = src(x, t, y)
        assert rel(shared(x, t, y), want) <= 1e-5 and rel(shared_sd(x, t, y), want) <= 1e-5
        assert rel(copy(x, t, y), want) > 1e-3


def test_half_precision_upstream_modules_convert(caplog):
    """bf16 upstream modules run under autocast (float32 timestep features into a bf16 MLP): the probe
    must call them that way, not find them 'broken' and leave them unconverted."""
    ft, pre = (m.to(torch.bfloat16) for m in upstream_pair(seed=30))
    with caplog.at_level(logging.INFO, logger="dgfast"):
        run_ft, run_pre = convert.dgfast_models(ft, pre)
    assert isinstance(run_ft, dgfast.DiT) and isinstance(run_pre, dgfast.DiT), caplog.text
    assert run_ft.x_embedder.proj.weight.dtype == torch.bfloat16


def test_converted_weights_are_read_once_per_call():
    """The converted DiTs share every tensor with the sources, whose values convert checks: the pair
    cache must not read all the values a second time in the same call (the exact check is a full
    pass over both models' weights). A dgfast DiT pair given directly is still checked by the cache."""
    ft, pre = upstream_pair(40)
    z, y = latents(2), torch.tensor([1, 2])
    dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="2")            # builds and caches
    with mock.patch.object(pair_cache, "content_digest", wraps=pair_cache.content_digest) as digest:
        dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="2")
    assert digest.call_count == 1
    run_ft, run_pre = convert.dgfast_models(ft, pre)
    with mock.patch.object(pair_cache, "content_digest", wraps=pair_cache.content_digest) as digest:
        dgfast.sample(run_ft, run_pre, z, y, guidance_scale=1.5, steps="2")
    assert digest.call_count == 1  # dgfast DiTs passed in: convert checks nothing, the cache checks


class NoTriton:
    def __getattr__(self, name):
        raise AssertionError(f"a Triton kernel ({name}) ran")


@pytest.mark.parametrize("paired", [True, False])
def test_explicit_backend_wins_over_the_variable_everywhere(paired, monkeypatch):
    """DGFAST_BACKEND=triton with backend='torch': no dgfast op and no Triton kernel runs, in the model
    forwards or the step (the variable replaces only "auto"; the models' ops used to follow it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    ft, pre = upstream_pair(75)
    z, y = latents(seed=3), torch.tensor([1, 2, 3])
    convert.dgfast_models(ft, pre)  # converted before the variable is set (the probe runs the default)
    monkeypatch.setenv("DGFAST_BACKEND", "triton")
    monkeypatch.setattr(ops, "triton_kernels", lambda: NoTriton())
    with Seen() as seen:
        dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="2", backend="torch", paired=paired)
    assert not any(name.startswith("dgfast") for name in seen.names), sorted(seen.names)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the control: "auto" follows the variable to the kernels
        with pytest.raises(AssertionError, match="Triton kernel"):
            dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="2", paired=paired)
