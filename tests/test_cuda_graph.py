"""sample(cuda_graph=True): the static-buffer loop of dgfast.cuda_graph (GraphedDoGStep / run_cuda_graph)
equals the eager loop bit for bit, ddpm / ddim and the multistep dpm2m, whose state (the previous
step's x0) must survive from one replay to the next.

On CPU the loop runs with the private `_capture=False` switch: the same buffers, coefficient rows
and copies, the step computed eagerly instead of replayed. The @cuda tests replay real graphs.
"""
import functools

import pytest
import torch

import dgfast
from dgfast import cuda_graph, ops, samplers
from dgfast.models import DiT
from dgfast.cuda_graph import GraphedDoGStep, guided_step_graphable, run_cuda_graph
from dgfast.pair_cache import get_pair
from dgfast.api import ReferenceNoise

CFG = dict(input_size=6, patch_size=2, hidden_size=36, depth=2, num_heads=3)  # 3x3 tokens
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm2m", 0.0)]
STEPS = "5"  # dpm2m: steps 1..2 read the previous x0, steps 0, 3 and 4 do not (samplers.dit_dpm2m)


def rand_dit(num_classes, seed) -> DiT:
    """Every parameter random (upstream init zeroes adaLN: blocks would be identities)."""
    g = torch.Generator().manual_seed(seed)
    m = DiT(**CFG, num_classes=num_classes).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


@pytest.fixture(scope="module")
def models():
    pre = rand_dit(1000, seed=0)
    ft = rand_dit(10, seed=1)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, CFG["input_size"], CFG["input_size"], generator=g)
    y = torch.tensor([1, 7, 0])
    return ft, pre, z, y


@pytest.fixture
def uncaptured(monkeypatch):
    """sample(cuda_graph=True) runs the static-buffer loop without capturing (so on CPU too)."""
    monkeypatch.setattr(cuda_graph, "run_cuda_graph", functools.partial(run_cuda_graph, _capture=False))


def eager_and_graphed(ft, pre, z, y, scale, sampler, eta, calls=2, **kw):
    """The eager torch loop once, then `calls` cuda_graph runs (the later ones reuse the cached,
    already used buffers), each from the same default-generator seed; returns outputs and RNG states."""
    args = dict(guidance_scale=scale, steps=STEPS, sampler=sampler, eta=eta, **kw)
    torch.manual_seed(0)
    want = dgfast.sample(ft, pre, z, y, backend="torch", **args)
    rng = torch.get_rng_state()
    got = []
    for _ in range(calls):
        torch.manual_seed(0)
        # backend="torch" for the forwards too (the eager loop's backend reaches its forwards)
        got.append((dgfast.sample(ft, pre, z, y, cuda_graph=True, backend="torch", **args), torch.get_rng_state()))
    return want, rng, got


# ----------------------------------------------------------------------------------------------
# CPU: the static-buffer loop, uncaptured
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,eta", SAMPLERS)
@pytest.mark.parametrize("scale", [1.5, 1.0], ids=["guided", "unguided"])
def test_static_buffer_loop_equals_eager(models, uncaptured, sampler, eta, scale):
    ft, pre, z, y = models
    z0 = z.clone()
    want, rng, got = eager_and_graphed(ft, pre, z, y, scale, sampler, eta)
    assert torch.isfinite(want).all()
    for out, rng_after in got:
        assert torch.equal(out, want), float((out - want).abs().max())
        assert torch.equal(rng_after, rng)  # same draws, same order: the generator ends where the eager one does
    assert torch.equal(z, z0)


def test_static_buffer_loop_per_sample_noise(models, uncaptured):
    ft, pre, z, y = models
    want, _, got = eager_and_graphed(ft, pre, z, y, 1.5, "ddpm", 0.0, calls=1, noise="per-sample",
                                     seeds=[3, 1, 4])
    assert torch.equal(got[0][0], want)


def test_cached_step_is_reused(models, uncaptured):
    ft, pre, z, y = models
    p = get_pair(ft, pre)
    p._graphs.clear()
    for sampler in ("dpm2m", "dpm2m", "ddpm", "ddpm"):
        dgfast.sample(ft, pre, z, y, steps=STEPS, sampler=sampler, cuda_graph=True)
    assert len(p._graphs) == 2
    p._graphs.clear()


def test_backend_reaches_the_graphed_forward(models, monkeypatch):
    """run_cuda_graph(backend="torch") passes it to forward_pair: no fused op runs in the step's
    forward (the models' own setting would run the C++ ops), and the result is the eager torch loop's."""
    ft, pre, z, y = models
    plan = samplers.native_plan("ddpm", STEPS)
    forward = get_pair(ft, pre).forward_pair
    draw = ReferenceNoise(len(z), 2 * len(z), z.shape, z.device, z.dtype)
    torch.manual_seed(0)
    with torch.no_grad():  # the eager torch loop: the step and both models' forwards on the torch twins
        ft.set_backend("torch"), pre.set_backend("torch")
        want = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps=STEPS, backend="torch", paired=False)
        ft.set_backend("auto"), pre.set_backend("auto")

    class NoFusedOps:
        def __getattr__(self, name):
            pytest.fail(f"a fused op ran: {name}")
    monkeypatch.setattr(ops, "cpp_extension", lambda: NoFusedOps())
    monkeypatch.setattr(ops, "triton_kernels", lambda: NoFusedOps())
    torch.manual_seed(0)
    got = run_cuda_graph(forward, z, y, 1000, plan, draw, scale=1.5, guidance_channels=3, backend="torch",
                         _capture=False)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def _dpm2m_inputs(models, scale=1.5):
    ft, pre, z, y = models
    plan = samplers.native_plan("dpm2m", STEPS)
    forward = functools.partial(get_pair(ft, pre).forward_pair, backend="torch")  # as sample(backend="torch")
    draw = ReferenceNoise(len(z), 2 * len(z), z.shape, z.device, z.dtype)
    return forward, plan, draw


def test_dpm2m_needs_the_state_copied(models):
    """The multistep term matters: the same loop with the prev buffer left at zero (rows unchanged,
    no x0 copied between steps) ends elsewhere, so dropping the copy fails the equality tests."""
    ft, pre, z, y = models
    forward, plan, draw = _dpm2m_inputs(models)
    assert plan.prev == [False, True, True, False, False] and not any(plan.noise)
    assert (plan.rows[[1, 2], 5] != 0).all()
    good = run_cuda_graph(forward, z, y, 1000, plan, draw, scale=1.5, guidance_channels=3, _capture=False)
    torch.manual_seed(0)
    want = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps=STEPS, sampler="dpm2m", backend="torch")
    assert torch.equal(good, want)

    step = GraphedDoGStep(forward, z, y, 1000, scale=1.5, k=3, step_mode="linear", clip_denoised=False,
                          uses_noise=False, uses_prev=True, _capture=False)
    S = plan.num_steps
    timesteps = torch.as_tensor(plan.timesteps, dtype=torch.int64)
    rows = torch.as_tensor(plan.rows, dtype=torch.float32)
    zeroed = step.run(z, y, timesteps, rows, [None] * S, [False] * S)  # T != 0, prev stays 0
    assert torch.isfinite(zeroed).all()
    assert (zeroed - want).abs().max() > 1e-3 * want.abs().max()
    # the same step object, given the flags, is the eager loop again (its buffers are reset per run)
    assert torch.equal(step.run(z, y, timesteps, rows, [None] * S, [i > 0 and v for i, v in enumerate(plan.prev)]),
                       want)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("with_prev,with_noise", [(True, True), (True, False), (False, True), (False, False)])
def test_graphable_linear_step_is_the_torch_step(clip, with_prev, with_noise):
    """Mode "linear" with coefficients in a tensor: a term the eager step skips is present in the
    graph with a zero coefficient and a zero buffer, and changes nothing."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 7)
    x, noise, prev = (torch.randn(shape, generator=g) for _ in range(3))
    out_ft, out_pre = torch.randn(3, 8, 5, 7, generator=g), torch.randn(3, 8, 5, 7, generator=g)
    row = [1.3, 0.7, 0.4, 0.9, -0.2, 0.35, 0.6]
    want, want_x0 = ops.guided_step_torch(x, out_ft, out_pre, noise if with_noise else None, row, scale=1.5,
                                          guidance_channels=3, step_mode="linear", clip_denoised=clip,
                                          prev=prev if with_prev else None, return_state=True)
    c = torch.tensor(row, dtype=torch.float32)
    c[5] = c[5] if with_prev else 0.0
    c[6] = c[6] if with_noise else 0.0
    got, got_x0 = guided_step_graphable(x, out_ft, out_pre, noise if with_noise else torch.zeros(shape), c,
                                        scale=1.5, k=3, step_mode="linear", clip_denoised=clip,
                                        prev=prev if with_prev else torch.zeros(shape), return_state=True)
    assert torch.equal(got, want) and torch.equal(got_x0, want_x0)


def test_public_option_needs_cuda_and_a_native_sampler(models):
    ft, pre, z, y = models
    with pytest.raises(ValueError, match="CUDA"):
        dgfast.sample(ft, pre, z, y, steps="2", sampler="dpm2m", cuda_graph=True)
    flow = samplers.native_plan("flow_euler", 3)
    forward, _, draw = _dpm2m_inputs(models)
    with pytest.raises(ValueError, match="dpm2m"):
        run_cuda_graph(forward, z, y, 1000, flow, draw, scale=1.5, guidance_channels=3, _capture=False)


# ----------------------------------------------------------------------------------------------
# CUDA: real graphs
# ----------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("sampler", ["ddpm", "dpm2m"])
def test_cuda_graph_replay_equals_eager(models, sampler):
    """Two calls in a row (the second replays the cached graph) against the eager torch-backend
    loop on the same device: same kernels for the step, so equal bit for bit, and the same RNG."""
    ft, pre, z, y = models
    dev = torch.device("cuda")
    ft, pre = rand_dit(10, seed=1).to(dev), rand_dit(1000, seed=0).to(dev)
    z, y = z.to(dev), y.to(dev)
    args = dict(guidance_scale=1.5, steps=STEPS, sampler=sampler)
    torch.manual_seed(0)
    want = dgfast.sample(ft, pre, z, y, backend="torch", **args)
    rng, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    for _ in range(2):
        torch.manual_seed(0)
        got = dgfast.sample(ft, pre, z, y, cuda_graph=True, backend="torch", **args)  # torch forwards, as eager
        assert torch.equal(torch.get_rng_state(), rng) and torch.equal(torch.cuda.get_rng_state(), rng_cuda)
        assert torch.equal(got, want), float((got - want).abs().max())
    assert len(get_pair(ft, pre)._graphs) == 1
