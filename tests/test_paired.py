"""Paired execution (dgfast.paired): one forward over [x; x] equals two separate forwards, the
report classifies every layer, LoRA pairs hold the base weights once, the cache rebuilds."""
import copy
import gc

import pytest
import torch

from dgfast.models import DiT
from dgfast.pair_cache import cache_entry, fingerprint, get_pair
from dgfast.paired import GEMMS, KINDS, PairedDiT, pair

CFG = dict(input_size=8, patch_size=2, hidden_size=48, depth=3, num_heads=3)
TOL = 1e-5
LINEARS = ("adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def rand_dit(num_classes=1000, seed=0, **kw) -> DiT:
    """A small DiT with every parameter random (upstream init zeroes adaLN: blocks would be identities)."""
    g = torch.Generator().manual_seed(seed)
    m = DiT(**{**CFG, **kw}, num_classes=num_classes).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def finetune_of(pre: DiT, seed=1, num_classes=10) -> DiT:
    """Every tensor moved (a full fine-tune), a new label table for the target domain."""
    g = torch.Generator().manual_seed(seed)
    ft = DiT(**CFG, num_classes=num_classes).eval()
    sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if k != "pos_embed" else v.clone())
          for k, v in pre.state_dict().items() if not k.startswith("y_embedder")}
    sd["y_embedder.embedding_table.weight"] = 0.2 * torch.randn(num_classes + 1, CFG["hidden_size"], generator=g)
    ft.load_state_dict(sd)
    return ft


def share_with(ft: DiT, pre: DiT, prefixes) -> None:
    """ft's parameters under `prefixes` become pre's Parameter objects (frozen, same storage)."""
    sd = {k: v for k, v in pre.state_dict(keep_vars=True).items() if k.startswith(tuple(prefixes))}
    ft.load_state_dict(sd, strict=False, assign=True)


def inputs(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, CFG["input_size"], CFG["input_size"], generator=g)
    t = torch.tensor([999, 500, 3, 250, 17][:n])
    y = torch.tensor([1, 7, 0, 9, 4][:n])
    return x, t, y


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def check_pair_matches(ft, pre, gemm, null=1000):
    x, t, y = inputs()
    p = pair(ft, pre, gemm=gemm)
    out_ft, out_pre = p.forward_pair(x, t, y, null)
    with torch.no_grad():
        ref_ft, ref_pre = ft(x, t, y), pre(x, t, torch.full_like(y, null))
    assert out_ft.shape == ref_ft.shape and out_pre.shape == ref_pre.shape
    assert torch.isfinite(out_ft).all() and torch.isfinite(out_pre).all()
    assert rel(out_ft, ref_ft) <= TOL, rel(out_ft, ref_ft)
    assert rel(out_pre, ref_pre) <= TOL, rel(out_pre, ref_pre)
    return p


def expected_kinds(block_kind, embed_kind, final_kind=None, x_kind=None):
    kinds = {"x_embedder.proj": x_kind or embed_kind, "pos_embed": "shared-activation",
             "t_embedder.mlp.0": embed_kind, "t_embedder.mlp.2": embed_kind,
             "y_embedder.embedding_table": "separate"}
    for i in range(CFG["depth"]):
        for lin in LINEARS:
            kinds[f"blocks.{i}.{lin}"] = block_kind(i, lin)
    for lin in ("final_layer.adaLN_modulation.1", "final_layer.linear"):
        kinds[lin] = final_kind or block_kind(CFG["depth"], lin)
    return kinds


@pytest.fixture(scope="module")
def pre():
    return rand_dit()


@pytest.mark.parametrize("gemm", GEMMS)
def test_full_finetune(pre, gemm):
    ft = finetune_of(pre)
    p = check_pair_matches(ft, pre, gemm)
    assert p.kinds() == expected_kinds(lambda i, lin: "stacked", "separate")
    # bmm and onednn hold a copy of every stacked layer (stacked, concatenated or prepacked); mm none
    copied = sum(r.bytes_two_models for r in p.rows if r.kind == "stacked")
    packed_biases = sum(m.get_parameter(f"{name}.bias").numel() * 4 for name in p.kinds() for m in (ft, pre)
                        if gemm == "onednn" and name.endswith(("fc1", "fc2", "final_layer.linear")))
    assert p.memory()["extra"] == (0 if gemm == "mm" else copied - packed_biases)  # prepacking copies weights only


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("how", ["same-tensors", "equal-values"])
def test_first_k_blocks_frozen(pre, gemm, how):
    k = 2
    ft = finetune_of(pre)
    frozen = ["x_embedder", "t_embedder", "pos_embed"] + [f"blocks.{i}." for i in range(k)]
    if how == "same-tensors":
        share_with(ft, pre, frozen)
        assert ft.blocks[0].attn.qkv.weight is pre.blocks[0].attn.qkv.weight
    else:
        ft.load_state_dict({n: v.clone() for n, v in pre.state_dict().items() if n.startswith(tuple(frozen))},
                           strict=False)
        assert ft.blocks[0].attn.qkv.weight.data_ptr() != pre.blocks[0].attn.qkv.weight.data_ptr()
    p = check_pair_matches(ft, pre, gemm)
    assert p.kinds() == expected_kinds(lambda i, lin: "shared" if i < k else "stacked", "shared-activation")


@pytest.mark.parametrize("gemm", GEMMS)
def test_identical_models(pre, gemm):
    for other in (pre, copy.deepcopy(pre)):  # the same object; an equal copy
        p = check_pair_matches(pre, other, gemm)
        assert p.kinds() == expected_kinds(lambda i, lin: "shared", "shared-activation")
        assert p.memory()["extra"] == 0


def lora_finetune(pre: DiT, r=4, seed=3):
    """ft = pre's weights (the same Parameter objects) + peft LoRA, own label table."""
    peft = pytest.importorskip("peft")
    ft = DiT(**CFG, num_classes=10).eval()
    share_with(ft, pre, [k for k in pre.state_dict() if not k.startswith("y_embedder")])
    ft = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"]),
                                      ft).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in ft.named_parameters():
            if "lora_" in name:  # peft starts B at zero (a no-op adapter): make the delta real
                prm.copy_(0.2 * torch.randn(prm.shape, generator=g))
            if name.startswith("y_embedder"):
                prm.copy_(0.2 * torch.randn(prm.shape, generator=g))
    return ft


def unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("gemm", GEMMS)
def test_lora_finetune(pre, gemm):
    ft = lora_finetune(pre)
    p = check_pair_matches(ft, pre, gemm)
    # "proj" also matches x_embedder.proj (a Conv2d): peft wraps it too, and the pair handles it.
    assert p.kinds() == expected_kinds(lambda i, lin: "shared" if lin == "adaLN_modulation.1" else "lora",
                                       "shared-activation", final_kind="shared", x_kind="lora")
    # One copy of the base weights: the pair allocates nothing and references only the models'
    # tensors; together the two models hold pre's weights + LoRA factors + ft's label table.
    assert p.memory()["extra"] == 0
    model_params = list(ft.parameters()) + list(pre.parameters())
    assert unique_bytes(model_params + p.tensors()) == unique_bytes(model_params)
    lora_bytes = sum(q.numel() * 4 for n, q in ft.named_parameters() if "lora_" in n)
    table = ft.y_embedder.embedding_table.weight
    assert unique_bytes(model_params) == unique_bytes(pre.parameters()) + lora_bytes + table.numel() * 4


@pytest.mark.parametrize("gemm", GEMMS)
def test_separate_fc1_keeps_its_gelu(pre, gemm):
    """A hooked fc1 runs as plain module calls ("separate"): its GELU must still be applied (with
    oneDNN it was meant for the GEMM's epilogue and got lost)."""
    ft = finetune_of(pre)
    ft.blocks[1].mlp.fc1.register_forward_hook(lambda mod, inp, out: out)
    p = check_pair_matches(ft, pre, gemm)
    assert p.kinds()["blocks.1.mlp.fc1"] == "separate"


@pytest.mark.parametrize("change", ["scale_layer", "set_scale"])
def test_lora_scale_change_rebuilds_the_pair(pre, change):
    """peft's set_scale / scale_layer change no tensor; the pair copied the old scaling."""
    ft = lora_finetune(pre)
    p1 = get_pair(ft, pre)
    from peft.tuners.lora import LoraLayer
    for mod in ft.modules():
        if isinstance(mod, LoraLayer):
            mod.scale_layer(2.0) if change == "scale_layer" else mod.set_scale("default", 0.5)
    p2 = get_pair(ft, pre)
    assert p2 is not p1
    x, t, y = inputs()
    with torch.no_grad():
        assert rel(p2.forward_pair(x, t, y)[0], ft(x, t, y)) <= TOL


def test_pairing_without_peft_does_not_import_it():
    """peft (and transformers with it) take seconds to import: a pair of plain DiTs must not."""
    import subprocess
    import sys
    code = ("import sys, torch, dgfast\n"
            "from dgfast.models import DiT\n"
            "cfg = dict(input_size=8, patch_size=2, hidden_size=48, depth=1, num_heads=3)\n"
            "a, b = DiT(**cfg, num_classes=10).eval(), DiT(**cfg, num_classes=1000).eval()\n"
            "dgfast.pair(a, b).forward_pair(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([1]), 1000)\n"
            "print('peft' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


def test_lora_over_finetuned_base(pre):
    """LoRA on top of a base that itself differs from pre: stacked GEMM + delta."""
    peft = pytest.importorskip("peft")
    ft = finetune_of(pre)
    share_with(ft, pre, ["x_embedder", "t_embedder", "pos_embed"])
    ft = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc1"]), ft).eval()
    with torch.no_grad():
        for name, prm in ft.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.2)
    p = check_pair_matches(ft, pre, gemm="bmm")
    assert p.kinds()["blocks.1.mlp.fc1"] == "stacked+lora"
    check_pair_matches(ft, pre, gemm="onednn")
    check_pair_matches(ft, pre, gemm="mm")
    assert p.kinds()["blocks.1.mlp.fc2"] == "stacked"


def test_disabled_and_merged_lora(pre):
    peft = pytest.importorskip("peft")
    ft = lora_finetune(pre)
    for mod in ft.modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            mod.enable_adapters(False)
    p = check_pair_matches(ft, pre, gemm="onednn")
    assert p.kinds()["blocks.0.attn.qkv"] == "shared"  # adapters off: the base alone, as peft runs it


def test_report_lists_every_layer(pre):
    p = pair(finetune_of(pre), pre, gemm="bmm")
    text = p.report()
    for name, kind in p.kinds().items():
        assert name in text
        assert kind in KINDS
    assert "stacked copies" in text
    mem = p.memory()
    assert mem["two_models"] >= mem["used"] > 0


def test_unsupported_wrapper_runs_separately(pre):
    ft = finetune_of(pre)
    ft.blocks[1].mlp.fc2.register_forward_hook(lambda m, i, o: o * 1.0)  # the pair must not skip hooks
    for gemm in GEMMS:
        p = check_pair_matches(ft, pre, gemm)
        assert p.kinds()["blocks.1.mlp.fc2"] == "separate"


def test_architecture_mismatch(pre):
    with pytest.raises(ValueError, match="depth"):
        pair(DiT(**{**CFG, "depth": 2}, num_classes=10), pre)
    with pytest.raises(TypeError, match="to_dgfast"):
        pair(torch.nn.Linear(2, 2), pre)


def test_null_label_tensor(pre):
    ft = finetune_of(pre)
    x, t, y = inputs()
    p = pair(ft, pre)
    a = p.forward_pair(x, t, y, 1000)
    b = p.forward_pair(x, t, y, torch.full_like(y, 1000))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_get_pair_cache_and_rebuild():
    pre = rand_dit(seed=11)
    ft = finetune_of(pre, seed=12)
    p1 = get_pair(ft, pre)
    assert get_pair(ft, pre) is p1
    x, t, y = inputs()
    before = p1.forward_pair(x, t, y)[0].clone()
    with torch.no_grad():  # an in-place edit bumps the version counter: the pair is rebuilt
        ft.blocks[1].mlp.fc1.weight.mul_(1.5)
    p2 = get_pair(ft, pre)
    assert p2 is not p1 and cache_entry(ft, pre).identity.fingerprint == fingerprint(ft, pre)
    after = p2.forward_pair(x, t, y)[0]
    with torch.no_grad():
        assert rel(after, ft(x, t, y)) <= TOL
    assert not torch.equal(before, after)
    ft.blocks[0].attn.qkv.weight = torch.nn.Parameter(ft.blocks[0].attn.qkv.weight.clone())  # new storage
    p3 = get_pair(ft, pre)
    assert p3 is not p2
    assert get_pair(ft, pre, rebuild=True) is not p3


@pytest.mark.parametrize("edit", ["data.mul_", "data.copy_", "equal-then-edited", "inference-tensors",
                                  "non-contiguous"])
def test_get_pair_sees_edits_that_bump_no_version(edit):
    """p.data edits and inference tensors change no version counter; the pair holds copies (stacked
    or prepacked) and reads one tensor of equal-valued layers: the weight sample must catch them."""
    pre = rand_dit(seed=13)
    if edit == "inference-tensors":
        with torch.inference_mode():
            ft = finetune_of(pre, seed=14)
            pre = copy.deepcopy(pre)
    else:
        ft = copy.deepcopy(pre) if edit == "equal-then-edited" else finetune_of(pre, seed=14)
        ft.y_embedder = finetune_of(pre, seed=14).y_embedder  # own label table: ft(x, t, y) is a fine-tune's
    if edit == "non-contiguous":  # e.g. a weight loaded as a transpose: sampled through a view, not a copy
        lin = ft.blocks[1].mlp.fc1
        lin.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous().t())
        assert not lin.weight.is_contiguous()
    x, t, y = inputs()
    p1 = get_pair(ft, pre)
    if edit == "equal-then-edited":
        assert p1.kinds()["blocks.1.mlp.fc1"] == "shared"  # equal values: the pair reads pre's tensor
    w = ft.blocks[1].mlp.fc1.weight
    if edit == "data.copy_":
        w.data.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    elif edit == "inference-tensors":
        with torch.inference_mode():
            w.mul_(1.5)
    else:
        w.data.mul_(1.5)
    # what the version counters alone would say
    assert cache_entry(ft, pre).identity.fingerprint == fingerprint(ft, pre)
    p2 = get_pair(ft, pre)
    assert p2 is not p1
    out = p2.forward_pair(x, t, y)[0]
    with torch.no_grad():
        assert rel(out, ft(x, t, y)) <= TOL


def test_dog_forward_follows_model_edits():
    import dgfast
    pre = rand_dit(seed=15)
    ft = finetune_of(pre, seed=16)
    fn = dgfast.dog_forward(ft, pre, null_label=1000, guidance_channels="all")
    x, t, y = inputs()
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 1000)])
    fn(x2, t2, y2, 1.5)
    ft.load_state_dict({k: v * 1.1 for k, v in ft.state_dict().items()})
    got = fn(x2, t2, y2, 1.5)
    want = dgfast.dog_forward(ft, pre, null_label=1000, guidance_channels="all", paired=False)(x2, t2, y2, 1.5)
    assert rel(got, want) <= TOL
    ft.train()
    with pytest.raises(ValueError, match="finetuned is in train mode"):
        fn(x2, t2, y2, 1.5)


@pytest.mark.parametrize("loop", [(999, 500, 500, 0), (0.0, 0.5, 0.5, 1.0)], ids=["dit-t-down", "sit-t-up-heun"])
def test_dog_forward_checks_weights_once_per_loop(loop, monkeypatch):
    """The full check (weights, labels, every submodule's mode) runs where a loop starts, in either
    direction of t, and nowhere else (a repeated t is Heun's second stage, not a new loop)."""
    import dgfast
    from dgfast import api
    pre = rand_dit(seed=17)
    ft = finetune_of(pre, seed=18)
    fn = dgfast.dog_forward(ft, pre, null_label=1000, guidance_channels="all")
    checks = []
    real = api.make_pair_forward
    monkeypatch.setattr(api, "make_pair_forward", lambda *a, **k: (checks.append(1), real(*a, **k))[1])
    x, _, y = inputs()
    x2, y2 = torch.cat([x, x]), torch.cat([y, torch.full_like(y, 1000)])
    for t in loop:
        fn(x2, torch.full((len(x2),), t), y2, 1.5)
    assert len(checks) == 1
    with torch.no_grad():  # an EMA-style edit between two loops: caught at the next loop's first step
        for q in ft.parameters():
            q.data.mul_(1.5)
    got = fn(x2, torch.full((len(x2),), loop[0]), y2, 1.5)
    assert len(checks) == 2
    want = dgfast.dog_forward(ft, pre, null_label=1000, guidance_channels="all", paired=False)(
        x2, torch.full((len(x2),), loop[0]), y2, 1.5)
    assert rel(got, want) <= TOL


def test_pair_of_meta_models_builds():
    """Shapes only (no values to sample for the cache check): building must still work."""
    with torch.device("meta"):
        ft, pre = DiT(**CFG, num_classes=10).eval(), DiT(**CFG, num_classes=1000).eval()
    assert "blocks.0.attn.qkv" in pair(ft, pre, gemm="bmm").kinds()


def test_get_pair_does_not_keep_models_alive():
    from dgfast import pair_cache
    pre = rand_dit(seed=21)
    ft = finetune_of(pre, seed=22)
    get_pair(ft, pre)
    assert ft in pair_cache._PAIRS
    del ft
    gc.collect()
    assert len([k for k in pair_cache._PAIRS.keys() if k is not pre]) == 0


def test_sample_paired_equals_two_pass(pre):
    import dgfast
    ft = finetune_of(pre)
    x, _, y = inputs()
    torch.manual_seed(0)
    a = dgfast.sample(ft, pre, x, y, steps="3", guidance_scale=1.5, paired=True)
    torch.manual_seed(0)
    b = dgfast.sample(ft, pre, x, y, steps="3", guidance_scale=1.5, paired=False)
    torch.manual_seed(0)
    c = dgfast.sample(ft, pre, x, y, steps="3", guidance_scale=1.5, paired=pair(ft, pre, gemm="bmm"))
    assert rel(a, b) <= 1e-5 and rel(c, b) <= 1e-5


def test_paired_is_a_class():
    assert isinstance(pair(rand_dit(), rand_dit(seed=2)), PairedDiT)


# ----------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_graphable_step_is_the_torch_step(mode):
    """The step replayed inside the CUDA graph reads its coefficients from a tensor; it must be
    ops.guided_step_torch bit for bit."""
    from dgfast import ops
    from dgfast.cuda_graph import guided_step_graphable
    from dgfast.schedule import Schedule
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 4, 5, 7, generator=g), torch.randn(3, 4, 5, 7, generator=g)
    out_ft, out_pre = torch.randn(3, 8, 5, 7, generator=g), torch.randn(3, 8, 5, 7, generator=g)
    sched = Schedule.from_steps("10")
    rows = sched.ddim_coefs(0.3) if mode == "ddim" else sched.ddpm_coefs()
    for j in (0, 4, 9):
        want = ops.guided_step_torch(x, out_ft, out_pre, noise, rows[j], scale=1.5, guidance_channels=3, step_mode=mode)
        got = guided_step_graphable(x, out_ft, out_pre, noise, torch.as_tensor(rows[j], dtype=torch.float32),
                                    scale=1.5, k=3, step_mode=mode, clip_denoised=False)
        assert torch.equal(got, want)


def _eager_plan(steps):
    from types import SimpleNamespace

    from dgfast.schedule import Schedule
    sched = Schedule.from_steps(steps)
    order = list(range(sched.num_steps - 1, -1, -1))  # the loop runs j = S-1 ... 0
    rows = sched.ddpm_coefs()[order]
    return SimpleNamespace(step_modes=["ddpm"] * len(order), rows=rows, noise=[True] * len(order),
                           timesteps=[int(sched.timestep_map[j]) for j in order], num_steps=len(order))


DEVICE = "cuda"  # the next test's device (set to "cpu" to dry-run it)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
@pytest.mark.parametrize("gemm", ["bmm", "mm"])
@pytest.mark.parametrize("frozen", [0, 2], ids=["full-finetune", "2-blocks-frozen"])
def test_pair_matches_two_forwards_on_cuda(pre, dtype, tol, attention, gemm, frozen):
    """The CPU tests above, on the GPU: stacked (and shared) GEMMs, one SDPA / xformers call over
    both halves, the Triton elementwise ops inside the blocks."""
    ft = finetune_of(pre)
    if frozen:
        share_with(ft, pre, ["x_embedder", "t_embedder", "pos_embed"] + [f"blocks.{i}." for i in range(frozen)])
    ft_c, pre_c = copy.deepcopy((ft, pre))  # one deepcopy: the shared Parameters stay shared
    pre_c.to(DEVICE, dtype), ft_c.to(DEVICE, dtype)
    for m in (ft_c, pre_c):
        try:
            m.set_attention(attention)
        except RuntimeError as err:
            pytest.skip(str(err))
    x, t, y = (v.to(DEVICE) for v in inputs())
    p = pair(ft_c, pre_c, gemm=gemm)
    want_kind = "shared" if frozen else "stacked"
    assert p.kinds()["blocks.0.attn.qkv"] == want_kind and p.kinds()["blocks.2.mlp.fc1"] == "stacked"
    out_ft, out_pre = p.forward_pair(x, t, y, 1000)
    with torch.no_grad():
        ref_ft, ref_pre = ft_c(x, t, y), pre_c(x, t, torch.full_like(y, 1000))
    for got, want in ((out_ft, ref_ft), (out_pre, ref_pre)):
        assert got.device.type == DEVICE and torch.isfinite(got).all()
        assert rel(got.float(), want.float()) <= tol, rel(got.float(), want.float())


@pytest.mark.cuda
def test_cuda_graph_loop_matches_eager():
    from dgfast import ops
    from dgfast.cuda_graph import run_cuda_graph
    dev = torch.device("cuda")
    pre = rand_dit().to(dev)
    ft = finetune_of(rand_dit()).to(dev)
    x, _, y = inputs()
    x, y = x.to(dev), y.to(dev)
    p = pair(ft, pre)
    plan = _eager_plan("5")
    n = len(x)

    def draw():
        return torch.randn((2 * n, *x.shape[1:]), device=dev)[:n]

    torch.manual_seed(0)
    want = x
    for i in range(plan.num_steps):
        t = torch.full((n,), plan.timesteps[i], device=dev)
        out_ft, out_pre = p.forward_pair(want, t, y, 1000)
        want = ops.guided_step_torch(want, out_ft, out_pre, draw(), plan.rows[i], scale=1.5, guidance_channels=3)
    rng_eager = torch.cuda.get_rng_state()
    for _ in range(2):  # the second call replays the cached graph
        torch.manual_seed(0)
        got = run_cuda_graph(p.forward_pair, x, y, 1000, plan, draw, scale=1.5, guidance_channels=3, cache=p._graphs)
        assert torch.equal(torch.cuda.get_rng_state(), rng_eager)
        assert rel(got, want) <= 1e-4
    assert len(p._graphs) == 1


def test_cuda_graph_option_checks(pre):
    import dgfast
    x, _, y = inputs()
    with pytest.raises(ValueError, match="CUDA"):
        dgfast.sample(finetune_of(pre), pre, x, y, steps="2", cuda_graph=True)
    with pytest.raises(ValueError, match="guidance_interval"):
        dgfast.sample(finetune_of(pre), pre, x, y, steps="2", cuda_graph=True, guidance_interval=(0.0, 0.5))


@pytest.mark.cuda
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_cuda_graph(sampler):
    import dgfast
    dev = torch.device("cuda")
    pre = rand_dit().to(dev)
    ft = finetune_of(rand_dit()).to(dev)
    x, _, y = inputs()
    x, y = x.to(dev), y.to(dev)
    torch.manual_seed(0)
    eta = 0.5 if sampler == "ddim" else 0.0  # eta is DDIM's (ddpm refuses a non-zero one)
    want = dgfast.sample(ft, pre, x, y, steps="6", sampler=sampler, eta=eta)
    rng = torch.cuda.get_rng_state()
    for _ in range(2):
        torch.manual_seed(0)
        got = dgfast.sample(ft, pre, x, y, steps="6", sampler=sampler, eta=eta, cuda_graph=True)
        assert torch.equal(torch.cuda.get_rng_state(), rng)
        assert rel(got, want) <= 1e-4
