"""The batch memory check (dgfast/memory.py): its bound is made of tensors that really are alive
together (so it never refuses a batch that fits), and a batch beyond the free memory is refused
before anything is written, naming the flag to lower."""
from __future__ import annotations

import pytest
import torch

import dgfast
from dgfast import memory
from dgfast.distributed import sample_to_dir
from dgfast.reference import ReferenceDiT

CFG = dict(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=3, num_classes=10)


def alive_in_mlp(model, n):
    """Bytes of the MLP's input and hidden activation, both alive in fc1's forward hook."""
    seen = []
    hook = model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(i[0].nbytes + o.nbytes))
    with torch.no_grad():
        model(torch.randn(n, 4, 8, 8), torch.full((n,), 3), torch.arange(n) % 10)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("make", [lambda: dgfast.DiT(**CFG), lambda: ReferenceDiT(**CFG)], ids=["dgfast", "upstream"])
def test_dit_bound_is_tensors_alive_together(make):
    model = make().eval()
    assert memory.dit_bound(model, 5)[0] == alive_in_mlp(model, 5)


def test_dit_bound_scales_with_the_weights_dtype():
    model = dgfast.DiT(**CFG).eval()
    assert memory.dit_bound(model, 5)[0] == 2 * memory.dit_bound(model.to(torch.bfloat16), 5)[0]


def test_vae_bound_is_tensors_alive_together():
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=8).eval()
    seen = []
    last = vae.decoder.up_blocks[-1].resnets[-1]
    hook = last.register_forward_hook(lambda m, i, o: seen.append(i[0].nbytes + o.nbytes))
    with torch.no_grad():
        vae.decode(torch.randn(3, 4, 5, 5))
    hook.remove()
    assert memory.vae_bound(vae, 3, 5)[0] == seen[0]
    vae.enable_slicing()
    assert memory.vae_bound(vae, 3, 5)[0] == seen[0] // 3
    vae.enable_tiling()
    assert memory.vae_bound(vae, 3, 5) is None


def test_free_memory_is_read_on_cpu():
    free = memory.free_bytes("cpu")
    assert free is None or free > 0


def test_a_batch_beyond_free_memory_is_refused_before_writing(tmp_path, monkeypatch):
    model = dgfast.DiT(**dict(CFG, input_size=4)).eval()
    need = memory.dit_bound(model, 64)[0]
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"a batch of 64 needs at least .* GiB for its DiT activations \(64 rows x 4 "
                                         r"tokens x \(48 \+ 192\) x 4 B\), but .* GiB are free on cpu: lower "
                                         r"batch_size \(dgfast sample: --per-proc-batch-size\)"):
        sample_to_dir(model, None, tmp_path / "out", num_samples=2, batch_size=64, num_classes=10, guidance_scale=1,
                      steps="2", progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "free_bytes", lambda device: need)  # exactly enough: not refused
    sample_to_dir(model, None, tmp_path / "out", num_samples=2, batch_size=64, num_classes=10, guidance_scale=1,
                  steps="2", progress=False)


def test_unknown_models_and_memory_are_not_checked(tmp_path):
    assert memory.dit_bound(lambda x, t, y: x, 4) is None
    assert memory.vae_bound(object(), 4, 32) is None
    memory.check_batch_memory(lambda x, t, y: x, None, 10 ** 9, 32, "cpu", "batch_size")  # nothing to estimate


@pytest.mark.cuda
def test_dit_bound_is_below_the_measured_cuda_peak():
    model = dgfast.DiT(**dict(CFG, input_size=32)).cuda().eval()
    x = torch.randn(64, 4, 32, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(x, torch.full((64,), 3, device="cuda"), torch.arange(64, device="cuda") % 10)
    torch.cuda.synchronize()
    assert memory.dit_bound(model, 64)[0] <= torch.cuda.max_memory_allocated() - base
