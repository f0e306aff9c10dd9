"""The embedded model pair (dgfast.zoo) through diffusers' own API: adapters.to_diffusers turns both
DiTs into DiTTransformer2DModels and DoGDiTPipeline(vae=None) samples 3x16x16 images from them.

Nothing here looks at image quality: the zoo's weights get retrained. The tests pin the plumbing:
the conversion is exact, and the pipeline is dgfast.sample on the converted-back pair (guidance,
pre-trained branch and scheduler noise included).
"""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, DiTTransformer2DModel  # noqa: E402

import dgfast  # noqa: E402
import dgfast.zoo  # noqa: E402
from dgfast.adapters import to_dgfast, to_diffusers  # noqa: E402
from dgfast.diffusers_pipeline import DoGDiTPipeline  # noqa: E402
from dgfast.models import DiT  # noqa: E402
from dgfast.zoo import data as zoo_data  # noqa: E402

STEPS, SCALE = 20, 2.0
S = zoo_data.IMAGE_SIZE  # the embedded pair's image side


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------
# to_diffusers
# ----------------------------------------------------------------------------------------------

def tiny_odd_dit(seed=0, **kw):
    """Odd sizes everywhere: 6x6 input, 3x3 patches, 3 heads of 12, 3 blocks, 7 classes, 3 channels."""
    torch.manual_seed(seed)
    cfg = dict(input_size=6, patch_size=3, in_channels=3, hidden_size=36, depth=3, num_heads=3, num_classes=7,
               learn_sigma=True)
    m = DiT(**{**cfg, **kw})
    with torch.no_grad():  # upstream zero-inits adaLN and the output: randomize so outputs are not trivial
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    return m.eval()


def odd_inputs(n=4, C=3, L=6, classes=7):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(n, C, L, L, generator=g), torch.tensor([0, 17, 500, 999][:n]),
            torch.tensor([0, 3, 6, classes][:n]))  # the last one is the null row


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_to_diffusers_round_trip(learn_sigma):
    m = tiny_odd_dit(learn_sigma=learn_sigma)
    rng = torch.random.get_rng_state()
    d = to_diffusers(m)
    assert torch.equal(rng, torch.random.get_rng_state())  # built on the meta device
    assert isinstance(d, DiTTransformer2DModel) and not d.training
    c = d.config
    assert (c.norm_type, c.norm_elementwise_affine, c.activation_fn) == ("ada_norm_zero", False, "gelu-approximate")
    assert (c.sample_size, c.patch_size, c.num_embeds_ada_norm, c.num_layers) == (6, 3, 7, 3)
    assert (c.num_attention_heads, c.attention_head_dim, c.in_channels) == (3, 12, 3)
    assert d.out_channels == (6 if learn_sigma else 3)
    assert not any(t.is_meta for t in [*d.parameters(), *d.buffers()])
    # every block holds its own copy of the one t/y embedder
    e0, e2 = d.transformer_blocks[0].norm1.emb, d.transformer_blocks[2].norm1.emb
    assert torch.equal(e0.class_embedder.embedding_table.weight, m.y_embedder.embedding_table.weight)
    assert e0.class_embedder.embedding_table.weight.data_ptr() != e2.class_embedder.embedding_table.weight.data_ptr()

    back = to_dgfast(d).eval()
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    # back has diffusers' numerics: it reproduces the diffusers model ...
    assert back.config["freq_divisor"] == 127 and back.config["mlp_norm_eps"] == c.norm_eps
    x, t, y = odd_inputs()
    with torch.no_grad():
        want = d(x, timestep=t, class_labels=y).sample
        assert rel(back(x, t, y), want) <= 1e-5
        # ... which differs slightly from m (timestep frequencies / 127 instead of / 128)
        assert rel(m(x, t, y), want) > 1e-5
    # and diffusers -> dgfast -> diffusers keeps the config
    again = to_diffusers(back)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == \
        {k: v for k, v in c.items() if not k.startswith("_")}


def test_to_diffusers_keeps_mode_and_dtype():
    m = tiny_odd_dit().double().train()
    d = to_diffusers(m)
    assert d.training and d.dtype == torch.float64 and d.pos_embed.pos_embed.dtype == torch.float64


def test_to_diffusers_rejects_what_diffusers_cannot_hold():
    with pytest.raises(ValueError, match="dit must be a dgfast"):
        to_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"dit .*null class"):
        to_diffusers(tiny_odd_dit(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="dit has an MLP width"):
        to_diffusers(tiny_odd_dit(mlp_ratio=2.0))


# ----------------------------------------------------------------------------------------------
# The embedded pair through DoGDiTPipeline
# ----------------------------------------------------------------------------------------------

def ddpm():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         variance_type="learned_range", clip_sample=False)


@pytest.fixture(scope="module")
def zoo():
    torch.set_num_threads(1)
    finetuned, pretrained, info = dgfast.zoo.load_pair()
    ft_d, pre_d = to_diffusers(finetuned), to_diffusers(pretrained)
    pipe = DoGDiTPipeline(transformer=ft_d, transformer_pre=pre_d, vae=None, scheduler=ddpm())
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(info["finetuned"]["config"]["num_classes"]))  # all 5 target classes
    return dict(pipe=pipe, ft_d=ft_d, pre_d=pre_d, info=info, labels=labels)


def run_pipe(zoo, seed=0, scale=SCALE, output_type="np"):
    return zoo["pipe"](class_labels=zoo["labels"], guidance_scale=scale, num_inference_steps=STEPS,
                       generator=torch.Generator().manual_seed(seed), output_type=output_type).images


def test_zoo_pair_converts(zoo):
    info, ft_d, pre_d = zoo["info"], zoo["ft_d"], zoo["pre_d"]
    assert len(zoo["labels"]) == 5 == ft_d.config.num_embeds_ada_norm
    assert pre_d.config.num_embeds_ada_norm == info["pretrained"]["null_label"]  # the pipeline's default null
    assert ft_d.config.in_channels == 3 and ft_d.config.sample_size == S and ft_d.out_channels == 6


def test_zoo_pipeline_outputs(zoo):
    B = len(zoo["labels"])
    arr = run_pipe(zoo, output_type="np")
    assert arr.shape == (B, S, S, 3) and arr.dtype.kind == "f"
    assert torch.isfinite(torch.from_numpy(arr)).all() and arr.min() >= 0 and arr.max() <= 1
    pil = run_pipe(zoo, output_type="pil")
    assert len(pil) == B and all(im.size == (S, S) and im.mode == "RGB" for im in pil)
    pt = run_pipe(zoo, output_type="pt")
    assert pt.shape == (B, 3, S, S) and torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    raw = run_pipe(zoo, output_type="latent")  # vae=None: the undecoded samples, [-1, 1] space
    assert raw.shape == (B, 3, S, S) and torch.equal((raw / 2 + 0.5).clamp(0, 1), pt)


def test_zoo_pipeline_is_dgfast_sample(zoo):
    """Same initial noise and step noise, same scheduler and steps: the pipeline is dgfast.sample on the
    converted-back pair, so it fails if the pipeline dropped guidance or the pre-trained branch."""
    info = zoo["info"]
    ft, pre = to_dgfast(zoo["ft_d"]).eval(), to_dgfast(zoo["pre_d"]).eval()
    B, seed = len(zoo["labels"]), 5
    raw = run_pipe(zoo, seed=seed, output_type="latent")
    arr = run_pipe(zoo, seed=seed, output_type="np")
    # noise="reference" draws from the default generator: seeded as the pipeline's generator, it gives
    # the same initial latents first, then the same per-step noise
    torch.manual_seed(seed)
    z = torch.randn(B, 3, S, S)
    assert torch.equal(z, torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed)))
    out = dgfast.sample(ft, pre, z, torch.tensor(zoo["labels"]), guidance_scale=SCALE, scheduler=ddpm(),
                        steps=STEPS, guidance_channels="all", null_label=info["pretrained"]["null_label"])
    assert rel(raw, out) < 1e-4
    img = (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert (img - torch.from_numpy(arr)).abs().max().item() < 1e-4

    # guidance matters: w = 1 (fine-tuned model alone) and w = 2 with another guiding null label differ
    plain = run_pipe(zoo, seed=seed, scale=1.0, output_type="latent")
    assert rel(plain, raw) > 1e-2
    other_null = zoo["pipe"](class_labels=zoo["labels"], guidance_scale=SCALE, num_inference_steps=STEPS,
                             generator=torch.Generator().manual_seed(seed), output_type="latent", null_class=0).images
    assert rel(other_null, raw) > 1e-2
    # and the w = 1 pipeline is dgfast.sample of the fine-tuned model alone
    torch.manual_seed(seed)
    z = torch.randn(B, 3, S, S)
    alone = dgfast.sample(ft, None, z, torch.tensor(zoo["labels"]), guidance_scale=1.0, scheduler=ddpm(),
                          steps=STEPS, guidance_channels="all")
    assert rel(plain, alone) < 1e-4
