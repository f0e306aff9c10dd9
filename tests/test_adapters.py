"""Model adapters (dgfast.adapters.to_dgfast): upstream modules and state_dicts, diffusers
DiTTransformer2DModel; converted models match their source forward and pair correctly."""
import pytest
import torch

from dgfast.adapters import SUPPORTED, to_dgfast
from dgfast.models import DiT
from dgfast.paired import pair
from dgfast.reference import ReferenceDiT

UP = dict(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=3)
TOL = 1e-5


def randomize(m, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def inputs(n=3, size=8, classes=10):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(n, 4, size, size, generator=g), torch.tensor([999, 321, 0][:n]),
            torch.tensor([0, classes - 1, classes][:n]))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def reference(seed=0, num_classes=10):
    return randomize(ReferenceDiT(**UP, num_classes=num_classes), seed)


def diffusers_dit(seed=0, num_classes=10, **kw):
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
               sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero",
               norm_elementwise_affine=False, activation_fn="gelu-approximate", attention_bias=True)
    m = diffusers.DiTTransformer2DModel(**{**cfg, **kw})
    randomize(m, seed)
    # diffusers keeps a copy of the t/y embedders in every block: make them the same model
    emb0 = m.transformer_blocks[0].norm1.emb.state_dict()
    for blk in m.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(emb0)
    return m


# ----------------------------------------------------------------------------------------------
# upstream layout
# ----------------------------------------------------------------------------------------------

def test_upstream_module():
    src = reference()
    m = to_dgfast(src)
    assert isinstance(m, DiT) and not m.training
    assert m.config["num_heads"] == 3 and m.config["num_classes"] == 10 and m.num_table_rows == 11
    x, t, y = inputs()
    with torch.no_grad():
        assert rel(m(x, t, y), src(x, t, y)) <= TOL
    # weights are copies, not aliases of the source
    assert m.blocks[0].attn.qkv.weight.data_ptr() != src.blocks[0].attn.qkv.weight.data_ptr()


def test_upstream_state_dict_and_checkpoint():
    src = reference(seed=1)
    x, t, y = inputs()
    with torch.no_grad():
        want = src(x, t, y)
    with pytest.raises(ValueError, match="num_heads"):  # 48 is not a zoo width: heads unknown
        to_dgfast(src.state_dict())
    m = to_dgfast(src.state_dict(), num_heads=3)
    assert m.config["num_classes"] == 10  # 11 rows, class dropout 0.1 (upstream default)
    with torch.no_grad():
        assert rel(m(x, t, y), want) <= TOL
    ckpt = {"model": reference(seed=9).state_dict(), "ema": src.state_dict(), "opt": {}, "args": None}
    with torch.no_grad():
        assert rel(to_dgfast(ckpt, num_heads=3)(x, t, y), want) <= TOL  # "ema" wins, as find_model
    m = to_dgfast(src.state_dict(), num_heads=3, class_dropout_prob=0.0)
    assert m.config["num_classes"] == 11  # DogFit-style: no null row


def test_zoo_width_infers_heads():
    sd = ReferenceDiT(input_size=4, patch_size=2, hidden_size=384, depth=1, num_heads=6, num_classes=3).state_dict()
    assert to_dgfast(sd).config["num_heads"] == 6


def test_conversion_leaves_rng_alone():
    sd = reference().state_dict()
    state = torch.get_rng_state()
    to_dgfast(sd, num_heads=3)
    assert torch.equal(state, torch.get_rng_state())


def test_dgfast_dit_passes_through():
    m = DiT(**UP, num_classes=10)
    assert to_dgfast(m) is m
    with pytest.raises(TypeError, match="already a dgfast DiT"):  # a config it would silently ignore
        to_dgfast(m, num_classes=3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of torch.jit
def test_wrapped_models_and_ddp_state_dicts_unwrap():
    """torch.compile's wrapper, DataParallel, and a state_dict saved from DDP ("module." keys)."""
    src = reference(seed=4)
    x, t, y = inputs()
    with torch.no_grad():
        want = src(x, t, y)
        for wrapped in (torch.nn.DataParallel(src), torch.compile(src)):
            assert rel(to_dgfast(wrapped)(x, t, y), want) <= TOL
        ddp_sd = {f"module.{k}": v for k, v in src.state_dict().items()}
        assert rel(to_dgfast({"ema": ddp_sd}, num_heads=3)(x, t, y), want) <= TOL


def test_unsupported_inputs():
    with pytest.raises(TypeError) as err:
        to_dgfast(torch.nn.Linear(3, 3))
    for line in SUPPORTED:
        assert line in str(err.value)
    with pytest.raises(TypeError, match="supported"):
        to_dgfast(42)
    with pytest.raises(ValueError, match="neither upstream"):
        to_dgfast({"foo.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="unknown config"):
        to_dgfast(reference(), heads=3)


def test_bad_weights_raise():
    sd = reference().state_dict()
    sd["blocks.0.attn.proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="attn.proj.weight"):
        to_dgfast(sd, num_heads=3)


# ----------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------

def test_diffusers_module_matches_diffusers_forward():
    src = diffusers_dit()
    m = to_dgfast(src)
    assert m.config["freq_divisor"] == 127 and m.config["mlp_norm_eps"] == 1e-5 and m.config["norm_eps"] == 1e-6
    assert m.config["num_classes"] == 10 and m.config["hidden_size"] == 48
    assert torch.equal(m.pos_embed, src.pos_embed.pos_embed)  # diffusers' own buffer
    x, t, y = inputs()
    with torch.no_grad():
        want = src(x, t, y).sample
        assert rel(m(x, t, y), want) <= TOL


def test_diffusers_state_dict():
    src = diffusers_dit(seed=2)
    with pytest.raises(ValueError, match="input_size"):
        to_dgfast(src.state_dict())
    with pytest.raises(ValueError, match="num_heads"):  # hidden 48 is not a zoo width
        to_dgfast(src.state_dict(), input_size=8)
    x, t, y = inputs()
    m = to_dgfast(src.state_dict(), input_size=8, num_heads=3)
    with torch.no_grad():
        assert rel(m(x, t, y), src(x, t, y).sample) <= TOL


def test_diffusers_mapping_is_upstream_layout():
    """Upstream weights -> diffusers layout (convert_dit_to_diffusers.py) -> to_dgfast with
    upstream numerics (freq_divisor=None, mlp_norm_eps=1e-6) gives upstream's forward back."""
    up = reference(seed=4)
    d = diffusers_dit()
    sd = up.state_dict()
    new = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(UP["depth"]):
        b, u = f"transformer_blocks.{i}", f"blocks.{i}"
        emb = f"{b}.norm1.emb"
        for s in ("weight", "bias"):
            new[f"{emb}.timestep_embedder.linear_1.{s}"] = sd[f"t_embedder.mlp.0.{s}"]
            new[f"{emb}.timestep_embedder.linear_2.{s}"] = sd[f"t_embedder.mlp.2.{s}"]
            new[f"{b}.norm1.linear.{s}"] = sd[f"{u}.adaLN_modulation.1.{s}"]
            for c, part in zip("qkv", sd[f"{u}.attn.qkv.{s}"].chunk(3)):
                new[f"{b}.attn1.to_{c}.{s}"] = part
            new[f"{b}.attn1.to_out.0.{s}"] = sd[f"{u}.attn.proj.{s}"]
            new[f"{b}.ff.net.0.proj.{s}"] = sd[f"{u}.mlp.fc1.{s}"]
            new[f"{b}.ff.net.2.{s}"] = sd[f"{u}.mlp.fc2.{s}"]
        new[f"{emb}.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    d.load_state_dict(new)
    d.pos_embed.pos_embed.copy_(sd["pos_embed"])
    m = to_dgfast(d, freq_divisor=None, mlp_norm_eps=1e-6)
    x, t, y = inputs()
    with torch.no_grad():
        assert rel(m(x, t, y), up(x, t, y)) <= TOL
        # and with diffusers' numerics it follows diffusers, not upstream
        m2 = to_dgfast(d)
        assert rel(m2(x, t, y), d(x, t, y).sample) <= TOL
        assert rel(m2(x, t, y), up(x, t, y)) > 10 * TOL


def test_diffusers_embedder_copies_must_agree():
    src = diffusers_dit()
    with torch.no_grad():
        src.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(1.0)
    with pytest.raises(ValueError, match="block 0"):
        to_dgfast(src)


# ----------------------------------------------------------------------------------------------
# converted models pair correctly
# ----------------------------------------------------------------------------------------------

def _converted(kind, seed, num_classes):
    if kind == "module":
        return to_dgfast(reference(seed, num_classes))
    if kind == "state_dict":
        return to_dgfast(reference(seed, num_classes).state_dict(), num_heads=3)
    return to_dgfast(diffusers_dit(seed, num_classes))


@pytest.mark.parametrize("kind", ["module", "state_dict", "diffusers"])
def test_converted_models_pair(kind):
    pre = _converted(kind, 0, 1000)
    ft = _converted(kind, 1, 10)
    x, t, y = inputs()
    out_ft, out_pre = pair(ft, pre).forward_pair(x, t, y, 1000)
    with torch.no_grad():
        assert rel(out_ft, ft(x, t, y)) <= TOL
        assert rel(out_pre, pre(x, t, torch.full_like(y, 1000))) <= TOL
