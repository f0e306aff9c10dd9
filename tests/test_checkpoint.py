"""load_checkpoint on odd, corrupt and hostile files: a clear error naming the file, and no
pickle code ever runs unless the caller opts in with trusted=True."""
from __future__ import annotations

import argparse
import os
import warnings

import pytest
import torch

import dgfast
from dgfast.checkpoint import CheckpointError, load_checkpoint

RAN = []


def _ran(tag):  # what a hostile pickle "executes": records that it ran
    RAN.append(tag)
    return tag


class Hostile:
    def __reduce__(self):
        return (_ran, ("pwned",))


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    m = dgfast.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                   num_classes=5, learn_sigma=True)
    return m.state_dict()


def test_upstream_train_checkpoint_loads_safely_without_opt_in(tmp_path, sd, monkeypatch):
    path = tmp_path / "0024000.pt"
    args = argparse.Namespace(model="DiT-XL/2", num_classes=5, image_size=256, results_dir="results")
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {"state": {}, "param_groups": []},
                "args": args}, path)
    # the safe load must be enough: a full (weights_only=False) load is never attempted
    real_load = torch.load

    def only_safe(*a, **kw):
        assert kw.get("weights_only") is True, "fell back to an unsafe load"
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", only_safe)
    with pytest.warns(UserWarning, match="'ema'"):
        got = load_checkpoint(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_hostile_pickle_is_refused_unless_trusted(tmp_path, sd):
    path = tmp_path / "evil.pt"
    torch.save({"ema": sd, "args": Hostile()}, path)
    RAN.clear()
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused.*_ran.*trusted=True.*--trust-checkpoint"):
        load_checkpoint(path)
    assert RAN == []  # nothing ran
    got = load_checkpoint(path, trusted=True)  # the explicit opt-in: a full pickle load
    assert RAN == ["pwned"] and got.keys() == sd.keys()


@pytest.mark.parametrize("name, data, match", [
    ("garbage.pt", b"not a checkpoint at all" * 10, "not a PyTorch checkpoint"),
    ("empty.pt", b"", "empty"),
    ("empty.safetensors", b"", "empty"),
    ("garbage.safetensors", b"\x00" * 100, "not a valid .safetensors"),
    ("pickled.pt", b"\x80\x02garbage after a pickle header", "corrupt"),
])
def test_corrupt_files_name_the_file(tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    for trusted in (False, True):
        with pytest.raises(CheckpointError, match=match) as err:
            load_checkpoint(path, trusted=trusted)
        assert os.fspath(path) in str(err.value)
    assert isinstance(err.value, ValueError)  # callers that catch ValueError keep working


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files_name_the_file(tmp_path, sd, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pt":
        torch.save(sd, whole)
    else:
        dgfast.save_safetensors(sd, whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="corrupt|truncated") as err:
        load_checkpoint(cut)
    assert os.fspath(cut) in str(err.value)


def test_plain_state_dict_loads_without_warning(tmp_path, sd):
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_checkpoint(path)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_model_is_used_when_ema_is_not_a_state_dict(tmp_path, sd):
    path = tmp_path / "emanone.pt"
    torch.save({"ema": None, "model": sd}, path)
    got = load_checkpoint(path)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "x.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="directory"):
        load_checkpoint(tmp_path / "x.pt")


# ----------------------------------------------------------------------------------------------
# weights_digest: every byte of every tensor (dgfast sample --resume compares it)
# ----------------------------------------------------------------------------------------------

def _model(sd):
    m = dgfast.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                   num_classes=5, learn_sigma=True)
    m.load_state_dict(sd)
    return m


def test_weights_digest_sees_every_byte(sd):
    from dgfast.checkpoint import weights_digest
    base = weights_digest(_model(sd))
    assert base.startswith("sha256:") and base == weights_digest(_model({k: v.clone() for k, v in sd.items()}))
    assert weights_digest(_model(sd), threads=1) == base  # the thread count does not change it
    name = "blocks.0.mlp.fc1.weight"
    for index in range(0, sd[name].numel(), 97):  # an edit anywhere in a tensor, not only where values were sampled
        edited = {k: v.clone() for k, v in sd.items()}
        edited[name].view(-1)[index] += 0.5
        assert weights_digest(_model(edited)) != base, index
    edited = {k: v.clone() for k, v in sd.items()}
    edited[name].view(-1).view(torch.int32)[3] ^= 1  # the lowest mantissa bit of one value
    assert weights_digest(_model(edited)) != base


def test_sampled_digest_missed_edits_the_full_one_sees(sd):
    """Why the full digest: the older one (still read for old manifests) reads 64 values per tensor."""
    from dgfast.checkpoint import sampled_weights_digest, weights_digest
    edited = {k: v.clone() for k, v in sd.items()}
    edited["blocks.0.mlp.fc1.weight"].view(-1)[1] += 0.5
    assert sampled_weights_digest(_model(edited)) == sampled_weights_digest(_model(sd))
    assert weights_digest(_model(edited)) != weights_digest(_model(sd))


def test_weights_digest_of_other_dtypes_and_names(sd):
    from dgfast.checkpoint import weights_digest
    m = _model(sd)
    base = weights_digest(m)
    assert weights_digest(m.to(torch.bfloat16)) not in (base, weights_digest(_model(sd).half()))
    renamed = torch.nn.Module()
    renamed.other = _model(sd)
    assert weights_digest(renamed) != base


@pytest.mark.cuda
def test_weights_digest_on_cuda_is_the_cpu_one(sd):
    from dgfast.checkpoint import weights_digest
    assert weights_digest(_model(sd).cuda()) == weights_digest(_model(sd))
