"""forward_pair's backend argument and torch.compile: backend="torch" reaches every fused op of the
paired forward (whatever the models' setting or DGFAST_BACKEND say), and the paired forward traces as
one graph (0 graph breaks) whose compiled output matches eager.

Until the fused ops are torch custom ops, their C++/Triton implementations are pybind calls dynamo
cannot trace: the compile tests run the forward with backend="torch"."""
import pytest
import torch

from dgfast import gemm_choice, ops
from dgfast.gemm_choice import TWO_PASS
from dgfast.paired import pair
from torch.library import opcheck

from test_paired import finetune_of, inputs, lora_finetune, rand_dit, rel, share_with

TOL = 1e-5


class NoFusedOps:
    """Stands in for the C++ extension and the Triton kernels: any fused op call fails the test."""

    def __getattr__(self, name):
        pytest.fail(f"a fused op ran: {name}")


@pytest.fixture
def no_fused_ops(monkeypatch):
    monkeypatch.setattr(ops, "cpp_extension", lambda: NoFusedOps())
    monkeypatch.setattr(ops, "triton_kernels", lambda: NoFusedOps())


@pytest.fixture
def models():
    pre = rand_dit()
    return finetune_of(pre), pre


@pytest.mark.parametrize("two_pass", [False, True], ids=["paired", "two-pass"])
def test_backend_torch_reaches_the_forward(models, no_fused_ops, monkeypatch, two_pass):
    """The models say "auto" (the C++ ops on CPU) and DGFAST_BACKEND says "cpp": an explicit
    backend="torch" must still run no fused op, in the measurement, the paired and the two-pass path."""
    ft, pre = models
    monkeypatch.setenv("DGFAST_BACKEND", "cpp")
    monkeypatch.setenv("DGFAST_GEMM_CACHE", "0")
    monkeypatch.setattr(gemm_choice, "_MEMORY", {})
    times = {"mm": 2e-3, TWO_PASS: 1e-3} if two_pass else {"mm": 1e-3, TWO_PASS: 2e-3}
    monkeypatch.setattr(gemm_choice, "time_call", lambda run, device, label=(): (run(), times.get(label[1], 1.0))[1])
    p = pair(ft, pre)
    x, t, y = inputs()
    got = p.forward_pair(x, t, y, 1000, backend="torch")
    assert p._plans[3].two_pass == two_pass
    with torch.no_grad():
        want = ft.set_backend("torch")(x, t, y), pre.set_backend("torch")(x, t, torch.full_like(y, 1000))
    for g, w in zip(got, want):
        assert rel(g, w) <= TOL
    ft.set_backend("auto")
    with pytest.raises(pytest.fail.Exception, match="a fused op ran"):  # the models' own setting: the C++ ops
        p.forward_pair(x, t, y, 1000)
    ft.set_backend("torch")
    p.forward_pair(x, t, y, 1000)  # backend=None follows the models' setting


def test_backend_argument_is_checked(models):
    p = pair(*models)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="backend"):
        p.forward_pair(x, t, y, 1000, backend="cuda")


def lora_pair():
    pre = rand_dit()
    return lora_finetune(pre), pre


def frozen_pair():
    pre = rand_dit()
    ft = finetune_of(pre)
    share_with(ft, pre, ["x_embedder", "t_embedder", "pos_embed", "blocks.0."])
    ft.blocks[2].mlp.fc2.register_forward_hook(lambda m, i, o: o * 1.0)  # a "separate" layer
    return ft, pre


@pytest.mark.parametrize("make", [lambda: (finetune_of(rand_dit()), rand_dit()), frozen_pair, lora_pair],
                         ids=["full-finetune", "frozen-and-hooked", "lora"])
@pytest.mark.parametrize("null", ["int", "tensor"])
def test_forward_pair_traces_without_graph_breaks(make, null):
    ft, pre = make()
    p = pair(ft, pre)
    x, t, y = inputs()
    null_label = 1000 if null == "int" else torch.full_like(y, 1000)
    p.forward_pair(x, t, y, null_label)  # an eager call first: its plan, buffers and caches exist
    torch._dynamo.reset()
    explained = torch._dynamo.explain(p.forward_pair)(x, t, y, null_label, "torch")
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_forward_pair_matches_eager():
    """Inductor on a one-block pair (compiling is slow on a CPU): within 1e-5 of eager."""
    cfg = dict(input_size=8, patch_size=2, hidden_size=48, depth=1, num_heads=3)
    pre = rand_dit(**cfg)
    ft = rand_dit(**cfg, seed=3)
    p = pair(ft, pre)
    x, t, y = inputs()
    want = p.forward_pair(x, t, y, 1000, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(p.forward_pair, fullgraph=True)
    got = compiled(x, t, y, 1000, "torch")
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel(g, w) <= TOL, rel(g, w)
    torch._dynamo.reset()


onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (CPU float32)")


@onednn
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_linear_opcheck_and_twin(gelu):
    """dgfast::packed_linear (oneDNN on a weight prepacked once, named by a handle) passes opcheck and
    equals F.linear (+ tanh-GELU) on awkward shapes."""
    from dgfast.pair_layers import PairLinear
    g = torch.Generator().manual_seed(5)
    ft_mod, pre_mod = torch.nn.Linear(37, 53), torch.nn.Linear(37, 53)
    pl = PairLinear("blocks.0.mlp.fc1", "fc1", ft_mod, pre_mod)
    pl.prepare("onednn")
    x = torch.randn(19, 37, generator=g)
    opcheck(torch.ops.dgfast.packed_linear, (x, ft_mod.bias.detach(), pl.handles[0], 53, gelu))
    want = torch.nn.functional.linear(x, ft_mod.weight, ft_mod.bias).detach()
    if gelu:
        want = torch.nn.functional.gelu(want, approximate="tanh")
    got = torch.ops.dgfast.packed_linear(x, ft_mod.bias.detach(), pl.handles[0], 53, gelu)
    assert rel(got, want) <= TOL
    handles = pl.handles
    pl.release("onednn")
    from dgfast import pair_layers
    assert not set(handles) & set(pair_layers._PACKED)  # an unchosen candidate's copy is dropped


@pytest.mark.parametrize("gemm,op", [pytest.param("onednn", "dgfast.packed_linear", marks=onednn),
                                     ("bmm", "baddbmm")])
def test_compiled_pair_keeps_the_measured_gemms(gemm, op):
    """With a strategy chosen, the traced paired forward keeps it (oneDNN: dgfast::packed_linear on the
    prepacked weights; bmm: one baddbmm over the stacked copy; one graph) instead of handing inductor
    plain F.linear per half; compiled output within 1e-5."""
    cfg = dict(input_size=8, patch_size=2, hidden_size=48, depth=1, num_heads=3)
    p = pair(rand_dit(**cfg, seed=3), rand_dit(**cfg), gemm=gemm)
    x, t, y = inputs()
    want = p.forward_pair(x, t, y, 1000, backend="torch")  # eager: the plan's prepacked copies exist
    torch._dynamo.reset()
    explained = torch._dynamo.explain(p.forward_pair)(x, t, y, 1000, "torch")
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    used = {f"{n.target.namespace}.{n.target._opname}" if isinstance(n.target, torch._ops.OpOverload)
            else getattr(n.target, "__name__", str(n.target)) for g in explained.graphs for n in g.graph.nodes}
    assert op in used, sorted(used)
    torch._dynamo.reset()
    got = torch.compile(p.forward_pair, fullgraph=True)(x, t, y, 1000, "torch")
    for g_, w in zip(got, want):
        assert g_.shape == w.shape and rel(g_, w) <= TOL, rel(g_, w)
    torch._dynamo.reset()


@pytest.mark.skipif(ops.cpp_extension() is None, reason="needs the C++ ops (what the compiled CPU graph should call)")
def test_compiled_pair_runs_the_cpp_gelu_in_place(monkeypatch):
    """On the CPU the compiled paired forward keeps fc1's GELU as the C++ op, in place on the bmm's
    output with each half's bias (as eager does), not traced into its torch twin (inductor's own
    GELU, ~3x slower here: bench/RESULTS.md); compiled output within 1e-5 of eager."""
    cfg = dict(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=3)
    p = pair(rand_dit(**cfg, seed=3), rand_dit(**cfg), gemm="bmm")
    x, t, y = inputs()
    want = p.forward_pair(x, t, y, 1000)
    real, calls = ops._IMPLS["cpp"]["gelu_tanh_"], []
    monkeypatch.setitem(ops._IMPLS["cpp"], "gelu_tanh_", lambda x, b: (calls.append(tuple(x.shape)), real(x, b))[1])
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.compile(p.forward_pair, fullgraph=True)(x, t, y, 1000)
    assert len(calls) == 2 * cfg["depth"], calls  # one per half per block
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel(g, w) <= TOL, rel(g, w)
    torch._dynamo.reset()
