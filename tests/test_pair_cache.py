"""The pair cache never serves old weights (dgfast.pair_cache): WeightsIdentity checks every value of
every tensor by default, so edits through `.data` or of inference tensors that change a single value
(or one row) rebuild the pair; the sampled check stays available as an opt-out."""
import copy

import pytest
import torch

from dgfast import ops
from dgfast.pair_cache import (WeightsIdentity, _digest_linear, _digest_torch, cache_entry, content_digest,
                               fingerprint, get_pair)

from test_paired import finetune_of, inputs, rand_dit, rel

TOL = 1e-5


def edit_one_value(w: torch.Tensor, index: int, delta: float = 0.5):
    """w's value at flat `index` += delta, through .data (no version counter moves)."""
    w.data.view(-1)[index] += delta


@pytest.mark.parametrize("edit", ["one-weight", "96-value-row", "one-bias", "inference-tensor", "shared-then-edited",
                                  "scale-by-2", "negate", "swap-two-values"])
def test_get_pair_sees_small_edits(edit):
    """Edits a sampled check misses (values between the sampled ones) and edits that a plain
    modular hash of the bits misses (every value's bits moved by the same power of two)."""
    pre = rand_dit(seed=13)
    if edit == "inference-tensor":
        with torch.inference_mode():
            ft = finetune_of(pre, seed=14)
            pre = copy.deepcopy(pre)
    elif edit == "shared-then-edited":  # equal values: the pair reads pre's fc1 for both halves
        ft = copy.deepcopy(pre)
        ft.y_embedder = finetune_of(pre, seed=14).y_embedder
    else:
        ft = finetune_of(pre, seed=14)
    x, t, y = inputs()
    p1 = get_pair(ft, pre)
    w = ft.blocks[1].mlp.fc1.weight  # (192, 48): the sampled check reads flat indices 0, 576, 1152, ...
    if edit == "shared-then-edited":
        assert p1.kinds()["blocks.1.mlp.fc1"] == "shared"
    if edit in ("one-weight", "shared-then-edited"):
        edit_one_value(w, 149)
    elif edit == "96-value-row":
        w.data.view(-1)[1:97].mul_(3.0)
    elif edit == "one-bias":
        edit_one_value(ft.blocks[1].mlp.fc1.bias, 7, 5e-3)
    elif edit == "inference-tensor":
        with torch.inference_mode():
            w.view(-1)[149] += 0.5
    elif edit == "scale-by-2":
        w.data.mul_(2.0)
    elif edit == "negate":
        w.data.neg_()
    else:
        flat = w.data.view(-1)
        flat[[3, 200]] = flat[[200, 3]].clone()
    assert cache_entry(ft, pre).identity.fingerprint == fingerprint(ft, pre)  # no version counter moved
    p2 = get_pair(ft, pre)
    assert p2 is not p1
    with torch.no_grad():
        assert rel(p2.forward_pair(x, t, y)[0], ft(x, t, y)) <= TOL


def test_every_value_of_every_tensor_is_checked():
    """One ulp anywhere, in any tensor of either model, is a change; putting it back is not."""
    pre = rand_dit(seed=21)
    ft = finetune_of(pre, seed=22)
    ident = WeightsIdentity(ft, pre)
    assert ident.exact and not ident.changed(ft, pre)
    g = torch.Generator().manual_seed(0)
    for m in (ft, pre):
        for name, p in m.named_parameters():
            flat = p.data.view(-1)
            i = int(torch.randint(flat.numel(), (1,), generator=g))
            old = flat[i].clone()
            flat[i] = torch.nextafter(old, torch.tensor(float("inf")))
            assert ident.changed(ft, pre), name
            flat[i] = old
            assert not ident.changed(ft, pre), name


def test_unchanged_weights_are_not_a_change():
    """NaN weights equal themselves; another thread count gives the same digest."""
    pre = rand_dit(seed=23)
    ft = finetune_of(pre, seed=24)
    with torch.no_grad():
        ft.blocks[0].attn.proj.weight[0, 0] = float("nan")
    ident = WeightsIdentity(ft, pre)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert not ident.changed(ft, pre)
    finally:
        torch.set_num_threads(threads)


def test_meta_models_have_an_identity():
    from dgfast.models import DiT
    with torch.device("meta"):
        ft, pre = DiT(input_size=8, patch_size=2, hidden_size=48, depth=1, num_heads=3), \
            DiT(input_size=8, patch_size=2, hidden_size=48, depth=1, num_heads=3)
    assert not WeightsIdentity(ft, pre).changed(ft, pre)


def test_sampled_check_is_an_opt_out(monkeypatch):
    """exact=False (or DGFAST_WEIGHTS_CHECK=sampled): the cheap check of a few values per tensor,
    which misses an edit of one value between them -- documented, not the default."""
    pre = rand_dit(seed=25)
    ft = finetune_of(pre, seed=26)
    fast = WeightsIdentity(ft, pre, exact=False)
    exact = WeightsIdentity(ft, pre)
    edit_one_value(ft.blocks[1].mlp.fc1.weight, 149)
    assert not fast.exact and not fast.changed(ft, pre)
    assert exact.changed(ft, pre)
    monkeypatch.setenv("DGFAST_WEIGHTS_CHECK", "sampled")
    assert not WeightsIdentity(ft, pre).exact
    p1 = get_pair(ft, pre)
    edit_one_value(ft.blocks[1].mlp.fc1.weight, 150)
    assert get_pair(ft, pre) is p1  # the opt-out's known blind spot
    ft.blocks[1].mlp.fc1.weight.data.mul_(1.5)  # a whole-tensor edit: still caught
    assert get_pair(ft, pre) is not p1
    monkeypatch.setenv("DGFAST_WEIGHTS_CHECK", "bogus")
    with pytest.raises(ValueError, match="DGFAST_WEIGHTS_CHECK"):
        WeightsIdentity(ft, pre)


def _digest_inputs():
    """Awkward tensors for the digest: odd lengths, byte counts not a multiple of 4, every dtype
    width, a 0-d tensor, an unaligned view, and one long enough to be split across threads."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))  # fresh inputs each run
    return [torch.randn(7, generator=g), torch.randn(3, 5, generator=g).t(),
            torch.randint(0, 256, (13,), dtype=torch.uint8, generator=g)[1:],
            torch.randn(11, generator=g).to(torch.bfloat16), torch.randn(5, dtype=torch.float64, generator=g),
            torch.tensor(3.0), torch.rand(6, generator=g) > 0.5, torch.randn(4, dtype=torch.complex64, generator=g),
            torch.randn((1 << 18) + 3, generator=g), torch.randint(-99, 99, (9,), dtype=torch.int16, generator=g)]


@pytest.mark.skipif(ops.cpp_extension() is None or not hasattr(ops.cpp_extension(), "weights_digest"),
                    reason="the C++ weights_digest is not built")
def test_cpp_digest_matches_its_torch_twin():
    """The C++ digest (one pass, threads, per-ISA code) gives the torch twin's integers, on every ISA
    this CPU has and for 1 and 2 threads."""
    ext = ops.cpp_extension()
    tensors = _digest_inputs()
    twin = [int(_digest_torch(t)) for t in tensors]
    threads, isa = torch.get_num_threads(), ext.cpu_isa()
    try:
        for name in ("base", "avx2", "avx512f"):
            try:
                ext.set_cpu_isa(name)
            except RuntimeError:  # not on this CPU
                continue
            for n in (1, 2):
                torch.set_num_threads(n)
                assert ext.weights_digest([t.contiguous() for t in tensors]).tolist() == twin, (name, n)
    finally:
        torch.set_num_threads(threads)
        ext.set_cpu_isa(isa)


def test_content_digest_is_plain_integers():
    """The weight check keeps Python ints (one per tensor, the C++ op's or the twin's), not tensors:
    the stored digest is compared on every sample() call and must not hold views of a result."""
    a, b = rand_dit(), rand_dit()
    digest = content_digest(a, b)
    assert digest and all(type(v) is int for v in digest)
    assert digest == content_digest(a, b)


def test_digest_sees_one_bit_anywhere():
    """Flipping any single bit of a tensor's bytes changes its digest (twin; the C++ op is compared
    with it above), including the padded last word of an odd byte count; and the GPU's digest too
    (run here on CPU tensors), whose float sums catch uniform edits (x2, negation)."""
    for t in _digest_inputs()[:8]:
        base = int(_digest_torch(t))
        raw = t.contiguous().reshape(-1).view(torch.uint8) if not t.is_complex() else \
            torch.view_as_real(t).contiguous().reshape(-1).view(torch.uint8)
        linear = [int(v) for v in _digest_linear(t.contiguous())]
        for byte in range(raw.numel()):
            for bit in (0, 7):
                edited = raw.clone()
                edited[byte] ^= 1 << bit
                assert int(_digest_torch(edited)) != base, (t.dtype, byte, bit)
                changed = edited.view(t.dtype).view(t.shape) if not t.is_complex() else None
                if changed is not None and t.is_contiguous():
                    assert [int(v) for v in _digest_linear(changed)] != linear, (t.dtype, byte, bit)
    w = torch.randn(1000)
    for edited in (w * 2, -w):
        assert [int(v) for v in _digest_linear(edited)] != [int(v) for v in _digest_linear(w)]
        assert int(_digest_torch(edited)) != int(_digest_torch(w))
