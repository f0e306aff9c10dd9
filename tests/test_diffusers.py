"""diffusers integration: DoGDiTPipeline and the DomainGuidance guider, on tiny random diffusers
DiTTransformer2DModels and a tiny random AutoencoderKL, through diffusers' own API."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline,  # noqa: E402
                       DiTTransformer2DModel, DPMSolverMultistepScheduler, EulerDiscreteScheduler)

from dgfast.diffusers_pipeline import DoGDiTPipeline  # noqa: E402
from dgfast.guiders import DomainGuidance  # noqa: E402

C, L = 4, 8


def tiny_dit(seed, classes):
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
                              num_layers=1, sample_size=L, patch_size=2, num_embeds_ada_norm=classes)
    with torch.no_grad():  # upstream zero-inits adaLN and the output: randomize so outputs are not trivial
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=C, norm_num_groups=4, sample_size=2 * L).eval()
    return dict(ft=tiny_dit(1, 10), pre=tiny_dit(2, 1000), vae=vae)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_loop(sch, ft, pre, labels, scale, steps, generator, learned=False):
    """What DoG through diffusers should compute: the fine-tuned model guided by the pre-trained
    one (null 1000) on all channels, latents x init_noise_sigma, generator passed to step()."""
    sch.set_timesteps(steps)
    y = torch.tensor(labels)
    x = torch.randn(len(labels), C, L, L, generator=generator) * sch.init_noise_sigma
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t)
        tt = t.expand(len(y))
        c = ft(x_in, timestep=tt, class_labels=y).sample
        u = pre(x_in, timestep=tt, class_labels=torch.full_like(y, 1000)).sample
        eps = u[:, :C] + scale * (c[:, :C] - u[:, :C])
        x = sch.step(torch.cat([eps, c[:, C:]], 1) if learned else eps, t, x, generator=generator).prev_sample
    return x


def test_pipeline_makes_images(parts):
    pipe = DoGDiTPipeline(parts["ft"], parts["pre"], parts["vae"], DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 7], guidance_scale=1.5, generator=gen(), num_inference_steps=6)
    assert len(out.images) == 2 and out.images[0].size == (2 * L, 2 * L)
    arr = pipe([1, 7], guidance_scale=1.5, generator=gen(), num_inference_steps=6, output_type="np").images
    assert arr.shape == (2, 2 * L, 2 * L, 3) and 0 <= arr.min() and arr.max() <= 1
    pt = pipe([1, 7], guidance_scale=1.5, generator=gen(), num_inference_steps=6, output_type="pt",
              return_dict=False)[0]
    assert torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))


PIPE_ERRORS = [
    # (message pattern, call overrides); each used to run silently or raise a raw torch error
    (r"num_inference_steps .*>= 1", dict(num_inference_steps=-3)),   # returned the latents as images
    (r"num_inference_steps .*>= 1", dict(num_inference_steps=0)),
    (r"guidance_scale", dict(guidance_scale=-1.0)),                   # ran unguided
    (r"guidance_scale", dict(guidance_scale=float("nan"))),
    (r"guidance_scale", dict(guidance_scale=float("inf"))),         # NaN images
    (r"class_labels holds 10", dict(class_labels=[0, 10])),
    (r"class_labels holds -1", dict(class_labels=[0, -1])),
    (r"class_labels must be a list", dict(class_labels=3)),
    (r"class_labels is empty", dict(class_labels=[])),
    (r"class_labels must hold ints", dict(class_labels=[0.0, 1.7])),
    (r"null_class 1001", dict(null_class=1001)),
    (r"latents must be float32", dict(latents=torch.zeros(2, C, L, L, dtype=torch.int64))),
    (r"latents must be float32", dict(latents=torch.zeros(2, C, L, L, dtype=torch.float64))),
    (r"latents contain NaN", dict(latents=torch.full((2, C, L, L), float("nan")))),
]


@pytest.mark.parametrize("pattern,over", PIPE_ERRORS, ids=[p for p, _ in PIPE_ERRORS])
def test_pipeline_rejects_bad_input(parts, pattern, over):
    pipe = DoGDiTPipeline(parts["ft"], parts["pre"], None, DDPMScheduler(clip_sample=False))
    kw = dict(class_labels=[1, 7], guidance_scale=1.5, num_inference_steps=3, output_type="latent")
    with pytest.raises((ValueError, TypeError), match=pattern):
        pipe(**{**kw, **over})


def test_pipeline_takes_arrays_and_tensors_for_numbers(parts):
    import numpy as np
    pipe = DoGDiTPipeline(parts["ft"], parts["pre"], None, DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="latent")
    want = pipe([1, 7], guidance_scale=1.5, generator=gen(), null_class=1000, **kw).images
    for labels, scale, null in [(np.array([1, 7]), np.float32(1.5), np.int64(1000)),
                                (torch.tensor([1, 7]), torch.tensor(1.5), torch.tensor(1000))]:
        got = pipe(labels, guidance_scale=scale, generator=gen(), null_class=null, **kw).images
        assert torch.equal(got, want)


def test_pipeline_rejects_train_mode_and_mismatched_models(parts):
    import copy
    ft = copy.deepcopy(parts["ft"]).train()
    pipe = DoGDiTPipeline(ft, parts["pre"], None, DDPMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match=r"transformer is in train mode"):
        pipe([1], num_inference_steps=2, output_type="latent")
    small = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
                                  num_layers=1, sample_size=L // 2, patch_size=2, num_embeds_ada_norm=1000).eval()
    pipe = DoGDiTPipeline(parts["ft"], small, None, DDPMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match=r"transformer and transformer_pre disagree on sample_size"):
        pipe([1], num_inference_steps=2, output_type="latent")


@pytest.mark.parametrize("name,make,learned", [
    ("ddpm-learned_range", lambda: DDPMScheduler(variance_type="learned_range", clip_sample=False), True),
    ("dpm-sde", lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), False),
    ("euler", lambda: EulerDiscreteScheduler(), False),
])
def test_pipeline_latents_match_reference_loop(parts, name, make, learned):
    """generator reaches the scheduler's noise, init_noise_sigma scales, learned sigma is kept."""
    pipe = DoGDiTPipeline(parts["ft"], parts["pre"], parts["vae"], make())
    pipe.set_progress_bar_config(disable=True)
    lat = pipe([2, 5, 9], guidance_scale=1.8, generator=gen(4), num_inference_steps=8, output_type="latent").images
    ref = reference_loop(make(), parts["ft"], parts["pre"], [2, 5, 9], 1.8, 8, gen(4), learned)
    assert rel_err(lat, ref) < 1e-5, name


def test_pipeline_matches_dgfast_sample_on_adapted_models(parts):
    """The same models converted by dgfast.adapters (one block, so the per-block embedders diffusers
    keeps are the one upstream has) through dgfast.sample: the pipeline is that call."""
    adapters = pytest.importorskip("dgfast.adapters")
    import dgfast
    ft, pre = adapters.to_dgfast(parts["ft"]).eval(), adapters.to_dgfast(parts["pre"]).eval()
    pipe = DoGDiTPipeline(parts["ft"], parts["pre"], parts["vae"], DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    lat = pipe([2, 5], guidance_scale=1.8, generator=gen(6), num_inference_steps=8, output_type="latent").images
    z = torch.randn(2, C, L, L, generator=gen(6))
    out = dgfast.sample(ft, pre, z, torch.tensor([2, 5]), guidance_scale=1.8, scheduler=DPMSolverMultistepScheduler(),
                        steps=8, guidance_channels="all", null_label=1000)
    assert rel_err(out, lat) < 1e-4


def test_without_pretrained_it_is_dit_pipeline(parts):
    """transformer_pre=None: classifier-free guidance with the transformer's own null class; with a
    deterministic scheduler the images equal DiTPipeline's."""
    dit = DiTPipeline(parts["pre"], parts["vae"], DDIMScheduler(clip_sample=False))
    dit.set_progress_bar_config(disable=True)
    want = dit([3, 4], guidance_scale=4.0, generator=gen(2), num_inference_steps=6, output_type="pt").images
    pipe = DoGDiTPipeline(parts["pre"], None, parts["vae"], DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    got = pipe([3, 4], guidance_scale=4.0, generator=gen(2), num_inference_steps=6, output_type="pt").images
    assert (got - want).abs().max() < 1e-5


def test_built_from_a_dit_pipeline(parts):
    dit = DiTPipeline(parts["pre"], parts["vae"], DDIMScheduler(clip_sample=False), id2label={0: "tench, fish"})
    pipe = DoGDiTPipeline(**dit.components, transformer_pre=parts["pre"], id2label={0: "tench, fish"})
    assert set(pipe.components) == {"transformer", "transformer_pre", "vae", "scheduler"}
    assert pipe.get_label_ids(["fish"]) == [0]


def test_pipeline_interval_skips_the_pretrained_model(parts):
    calls = []
    pre = parts["pre"]
    handle = pre.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        pipe = DoGDiTPipeline(parts["ft"], pre, parts["vae"], DDIMScheduler(clip_sample=False))
        pipe.set_progress_bar_config(disable=True)
        pipe([1], guidance_scale=2.0, generator=gen(), num_inference_steps=10, output_type="latent",
             guidance_interval=(0.0, 0.3))
    finally:
        handle.remove()
    assert len(calls) == 3


# ----------------------------------------------------------------------------------------------
# DomainGuidance guider
# ----------------------------------------------------------------------------------------------

def guider_loop(guider, denoiser, scheduler, x, y, null_ft, steps):
    """A modular-pipeline denoise loop, as diffusers' guider protocol runs it."""
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        batches = guider.prepare_inputs({"class_labels": (y, torch.full_like(y, null_ft))})
        for batch in batches:
            guider.prepare_models(denoiser)
            batch.noise_pred = denoiser(x, timestep=t.expand(len(x)), class_labels=batch.class_labels).sample
            guider.cleanup_models(denoiser)
        pred = guider(batches)[0]
        x = scheduler.step(pred[:, :C], t, x).prev_sample
    return x


@pytest.mark.parametrize("stop", [1.0, 0.5])
def test_domain_guidance_guider(parts, stop):
    ft, pre = parts["ft"], parts["pre"]
    calls = []
    handle = pre.register_forward_pre_hook(lambda m, a, k: calls.append(k.get("class_labels")), with_kwargs=True)
    try:
        guider = DomainGuidance(guidance_scale=2.0, null_class=1000, guidance_channels=C, stop=stop)
        guider.set_pretrained_model(pre)
        x0, y = torch.randn(2, C, L, L, generator=gen(5)), torch.tensor([1, 2])
        with torch.no_grad():
            out = guider_loop(guider, ft, DDIMScheduler(clip_sample=False), x0, y, 10, 8)
    finally:
        handle.remove()
    assert len(calls) == int(stop * 8) and all(bool((c == 1000).all()) for c in calls)
    # hand-written DoG combine
    sch = DDIMScheduler(clip_sample=False)
    sch.set_timesteps(8)
    x = x0
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            tt = t.expand(2)
            eps = ft(x, timestep=tt, class_labels=y).sample[:, :C]
            if i < int(stop * 8):
                u = pre(x, timestep=tt, class_labels=torch.full_like(y, 1000)).sample[:, :C]
                eps = u + 2.0 * (eps - u)
            x = sch.step(eps, t, x).prev_sample
    assert torch.equal(out, x)
    assert not hasattr(ft, "_diffusers_hook") or ft._diffusers_hook.get_hook("dgfast_domain_guidance") is None


def test_domain_guidance_config_and_errors(parts, tmp_path):
    g = DomainGuidance(guidance_scale=1.7, guidance_rescale=0.3, null_class=1000, start=0.1, stop=0.9)
    g.save_pretrained(tmp_path)
    h = DomainGuidance.from_pretrained(tmp_path)
    assert (h.guidance_scale, h.guidance_rescale, h.null_class, h._start, h._stop) == (1.7, 0.3, 1000, 0.1, 0.9)
    assert h.new(guidance_scale=3.0).guidance_scale == 3.0
    g.set_state(step=1, num_inference_steps=5, timestep=torch.tensor(500))
    g.prepare_models(parts["ft"])  # the conditional batch needs no pre-trained model
    with pytest.raises(ValueError, match="set_pretrained_model"):
        g.prepare_models(parts["ft"])
    # rescale and the original formulation, against diffusers' own CFG guider on the same predictions
    from diffusers import ClassifierFreeGuidance
    c, u = torch.randn(2, C, L, L, generator=gen(1)), torch.randn(2, C, L, L, generator=gen(2))
    for orig in (False, True):
        dog = DomainGuidance(guidance_scale=1.7, guidance_rescale=0.3, use_original_formulation=orig)
        cfg = ClassifierFreeGuidance(guidance_scale=1.7, guidance_rescale=0.3, use_original_formulation=orig)
        assert torch.allclose(dog(_batches(dog, c, u)).pred, cfg(_batches(cfg, c, u)).pred, atol=1e-6)


def _batches(guider, c, u):
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(0))
    batches = guider.prepare_inputs({"noise_pred": (c, u)})
    return batches


def _one_step(guider, denoiser, call, y, null_ft):
    """One guided step of the guider protocol; call(denoiser, labels) runs the denoiser."""
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(500))
    batches = guider.prepare_inputs({"class_labels": (y, torch.full_like(y, null_ft))})
    for batch in batches:
        guider.prepare_models(denoiser)
        batch.noise_pred = call(denoiser, batch.class_labels)
        guider.cleanup_models(denoiser)
    return guider(batches).pred


def _hooked(model):
    return hasattr(model, "_diffusers_hook") and model._diffusers_hook.get_hook("dgfast_domain_guidance") is not None


def test_domain_guidance_restores_the_denoiser_when_the_forward_raises(parts):
    ft, pre = parts["ft"], parts["pre"]
    x, t, y = torch.randn(2, C, L, L, generator=gen(4)), torch.full((2,), 500), torch.tensor([1, 2])

    class Boom(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise KeyboardInterrupt

    call = lambda m, labels: m(x, timestep=t, class_labels=labels).sample  # noqa: E731
    with torch.no_grad():
        want = ft(x, timestep=t, class_labels=y).sample
        with pytest.raises(KeyboardInterrupt):  # the step is interrupted before cleanup_models
            _one_step(DomainGuidance(guidance_scale=2.0, null_class=7).set_pretrained_model(Boom()), ft, call, y, 10)
        assert not _hooked(ft)
        assert torch.equal(ft(x, timestep=t, class_labels=y).sample, want)  # the fine-tuned model again
        g = DomainGuidance(guidance_scale=2.0, null_class=1000).set_pretrained_model(pre)
        u = pre(x, timestep=t, class_labels=torch.full_like(y, 1000)).sample
        assert torch.allclose(_one_step(g, ft, call, y, 10), u + 2.0 * (want - u), atol=1e-6)


def test_domain_guidance_replaces_a_stale_hook(parts):
    ft, pre = parts["ft"], parts["pre"]
    g = DomainGuidance(guidance_scale=2.0, null_class=1000).set_pretrained_model(pre)
    g.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(500))
    g.prepare_inputs({"class_labels": (torch.tensor([1]), torch.tensor([10]))})
    g.prepare_models(ft)
    g.prepare_models(ft)  # unconditional batch, cleanup never ran (interrupted between calls)
    h = g.new()
    h.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(500))
    h.prepare_models(ft)
    h.prepare_models(ft)  # was "Hook with name dgfast_domain_guidance already exists"
    h.cleanup_models(ft)
    assert not _hooked(ft)


@pytest.mark.parametrize("how", ["positional", "class_labels", "y"])
def test_domain_guidance_null_class_reaches_the_pretrained_model(how):
    """Labels passed positionally, as class_labels= (diffusers) or y= (upstream DiT) all become
    the pre-trained model's null class."""
    from dgfast import zoo
    ft, pre, info = zoo.load_pair()
    x, t, y = torch.randn(3, 3, 16, 16, generator=gen(6)), torch.full((3,), 500), torch.tensor([0, 3, 4])
    call = {"positional": lambda m, labels: m(x, t, labels), "class_labels": None,
            "y": lambda m, labels: m(x, t, y=labels)}[how]
    if call is None:
        from dgfast.adapters import to_diffusers
        ft, pre = to_diffusers(ft), to_diffusers(pre)
        call = lambda m, labels: m(x, timestep=t, class_labels=labels).sample  # noqa: E731
    with torch.no_grad():
        c, u = call(ft, y), call(pre, torch.full_like(y, 10))
        for null_class in (10, None):  # None: the pre-trained model's own null row (10), not the fine-tuned 5
            g = DomainGuidance(guidance_scale=2.0, null_class=null_class).set_pretrained_model(pre)
            assert torch.allclose(_one_step(g, ft, call, y, 5), u + 2.0 * (c - u), atol=1e-5)


def test_domain_guidance_refuses_labels_it_cannot_replace(parts):
    ft, pre = parts["ft"], parts["pre"]
    x, t, y = torch.randn(2, C, L, L, generator=gen(4)), torch.full((2,), 500), torch.tensor([1, 2])

    class Wrapped(torch.nn.Module):  # takes its labels under a keyword the guider cannot know
        def __init__(self):
            super().__init__()
            self.inner = ft

        def forward(self, x, t, labels=None):
            return self.inner(x, timestep=t, class_labels=labels).sample

    denoiser = Wrapped()
    g = DomainGuidance(guidance_scale=2.0, null_class=1000).set_pretrained_model(pre)
    with torch.no_grad(), pytest.raises(TypeError, match="class_labels= or y="):
        _one_step(g, denoiser, lambda m, labels: m(x, t, labels=labels), y, 10)
    assert not _hooked(denoiser)


def test_domain_guidance_default_null_class(parts):
    ft, pre = parts["ft"], parts["pre"]  # fine-tuned null 10, pre-trained null 1000
    seen = []
    handle = pre.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("class_labels")), with_kwargs=True)
    x, t, y = torch.randn(2, C, L, L, generator=gen(4)), torch.full((2,), 500), torch.tensor([1, 2])
    try:
        with torch.no_grad():
            _one_step(DomainGuidance(guidance_scale=2.0).set_pretrained_model(pre), ft,
                      lambda m, labels: m(x, timestep=t, class_labels=labels).sample, y, 10)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].tolist() == [1000, 1000]
    with pytest.raises(ValueError, match="null_class"):  # a plain callable does not say what its null is
        DomainGuidance(guidance_scale=2.0).set_pretrained_model(lambda *a, **k: None)
    DomainGuidance(guidance_scale=2.0, null_class=3).set_pretrained_model(lambda *a, **k: None)

    class LabelFree(torch.nn.Module):  # e.g. a text-conditioned denoiser: no classes, no null to give
        def forward(self, x, timestep=None, encoder_hidden_states=None):
            return x
    g = DomainGuidance(guidance_scale=2.0).set_pretrained_model(LabelFree())
    from dgfast.guiders import _null_labels
    assert _null_labels((x,), {"timestep": t}, g._null_for(g.pretrained_model)) == ((x,), {"timestep": t})
    with pytest.raises(ValueError, match="null_class 1001 is outside"):
        DomainGuidance(guidance_scale=2.0, null_class=1001).set_pretrained_model(pre)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(guidance_scale=None), "guidance_scale"), (dict(guidance_scale="2"), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_channels=-1), "guidance_channels"), (dict(guidance_channels=3.7), "guidance_channels"),
    (dict(guidance_channels="some"), "guidance_channels"), (dict(null_class=9.7), "null_class"),
    (dict(null_class=-1), "null_class"), (dict(guidance_rescale=-1), "guidance_rescale"),
    (dict(start=-0.1), "start"), (dict(stop=1.5), "stop"), (dict(start=0.6, stop=0.5), "start must be below stop"),
])
def test_domain_guidance_validates_its_settings(kwargs, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        DomainGuidance(**kwargs)


def test_domain_guidance_channels_all_new_and_self_guidance(parts):
    ft, pre = parts["ft"], parts["pre"]
    x, t, y = torch.randn(2, C, L, L, generator=gen(4)), torch.full((2,), 500), torch.tensor([1, 2])
    call = lambda m, labels: m(x, timestep=t, class_labels=labels).sample  # noqa: E731
    with torch.no_grad():
        g = DomainGuidance(guidance_scale=2.0, guidance_channels="all", null_class=1000).set_pretrained_model(pre)
        everything = _one_step(g, ft, call, y, 10)
        h = g.new(guidance_channels=None)  # new() keeps the pre-trained model
        assert h.pretrained_model is pre and torch.equal(_one_step(h, ft, call, y, 10), everything)
        with pytest.raises(ValueError, match="guidance_channels"):  # more channels than the prediction has
            _one_step(g.new(guidance_channels=2 * C + 1), ft, call, y, 10)
        with pytest.raises(ValueError, match="denoiser itself"):
            _one_step(DomainGuidance(guidance_scale=2.0).set_pretrained_model(ft), ft, call, y, 10)
        assert not _hooked(ft)
