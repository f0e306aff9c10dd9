"""The sample folder's guards (dgfast/sample_dir.py) through dgfast.sample_to_dir: per-file checksums
in manifest.json, damaged or replaced files drawn again on resume, the .npz built only from files
that match, and the folder lock (one writer; a lock left by a dead process is taken over)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dgfast
from dgfast.distributed import make_npz, sample_to_dir
from dgfast.sample_dir import CHECKSUM_DIR, LOCK_NAME, FolderLocked, file_checksum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = dgfast.DiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.eval()


def run(model, folder, **kw):
    args = dict(num_samples=N, batch_size=2, num_classes=10, guidance_scale=1, steps="4", progress=False)
    args.update(kw)
    return sample_to_dir(model, None, folder, **args)


def contents(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f.endswith(".npy")}


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """A clean, uninterrupted run: its files and .npz bytes."""
    folder = tmp_path_factory.mktemp("ref") / "s"
    run(model, folder)
    return contents(folder), open(str(folder) + ".npz", "rb").read()


def test_manifest_holds_every_files_checksum(model, tmp_path, reference):
    folder = tmp_path / "s"
    run(model, folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert files == {name: file_checksum(data) for name, data in reference[0].items()}
    assert sorted(os.listdir(folder)) == sorted(reference[0]) + ["manifest.json"]  # no lock, no logs left


DAMAGE = {
    "replaced by a valid all-zeros .npy": lambda path: np.save(path, np.zeros((4, 4, 4), np.float32)),
    "emptied (0 bytes)": lambda path: open(path, "wb").close(),
    "cut short": lambda path: open(path, "r+b").truncate(40),
    "one byte changed": lambda path: open(path, "r+b").write(b"\x93NUMPX"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_file_is_drawn_again_on_resume(how, model, tmp_path, reference, capsys):
    folder = tmp_path / "s"
    run(model, folder)
    os.remove(str(folder) + ".npz")
    DAMAGE[how](str(folder / "000003.npy"))
    capsys.readouterr()
    result = run(model, folder, resume=True)
    err = capsys.readouterr().err
    assert "drawing 1 damaged sample file(s) again: 000003.npy" in err, err
    assert (result.num_written, result.num_skipped) == (1, N - 1)
    assert contents(folder) == reference[0]
    assert open(str(folder) + ".npz", "rb").read() == reference[1]


def test_file_the_runs_did_not_write_is_drawn_again(model, tmp_path, reference, capsys):
    """A sample file with no recorded checksum in a folder that records them: not this folder's."""
    folder = tmp_path / "s"
    run(model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["000001.npy"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run(model, folder, resume=True)
    assert "000001.npy has no recorded checksum" in capsys.readouterr().err
    assert contents(folder) == reference[0]


def test_npz_is_built_only_from_files_that_match(model, tmp_path):
    folder = tmp_path / "s"
    run(model, folder, npz=False)
    np.save(folder / "000002.npy", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"000002\.npy does not match the checksum recorded when it was written"):
        make_npz(folder, N)
    assert not os.path.exists(str(folder) + ".npz")


def test_folder_from_before_checksums_resumes(model, tmp_path, reference, capsys):
    """No "files" in its manifest: finished files are checked for readability only; the checksums are
    recorded once the run ends."""
    folder = tmp_path / "s"
    run(model, folder)
    os.remove(str(folder) + ".npz")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    open(folder / "000004.npy", "wb").close()
    run(model, folder, resume=True)
    assert "000004.npy is empty (0 bytes)" in capsys.readouterr().err
    assert contents(folder) == reference[0]
    assert json.loads((folder / "manifest.json").read_text())["files"]["000004.npy"] == \
        file_checksum(reference[0]["000004.npy"])


def test_checksums_of_a_killed_run_are_in_its_log(model, tmp_path, reference):
    """Before the end of a run, the checksums live in per-process logs; a resume reads them."""
    folder = tmp_path / "s"
    run(model, folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {}                                   # as the manifest is while a run is going
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / CHECKSUM_DIR).mkdir()
    (folder / CHECKSUM_DIR / "host-1.log").write_text("".join(f"{k} {v}\n" for k, v in files.items()) + "000004.n")
    os.remove(str(folder) + ".npz")
    result = run(model, folder, resume=True)
    assert result.num_written == 0 and contents(folder) == reference[0]


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from dgfast.sample_dir import FolderLock
lock = FolderLock(sys.argv[1]); lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(folder):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_lock_stops_a_second_writer_and_a_dead_one_is_taken_over(model, tmp_path, reference, capsys):
    folder = tmp_path / "s"
    run(model, folder)
    os.remove(folder / "000001.npy")
    (folder / ".000001.npy.4242.tmp").write_bytes(b"the other writer's file in progress")
    holder = _hold_lock(folder)
    try:
        with pytest.raises(FolderLocked, match=rf"is being written by another dgfast run \(pid {holder.pid} on "):
            run(model, folder, resume=True)
        assert (folder / ".000001.npy.4242.tmp").exists()     # nothing of the other writer's was touched
        assert not (folder / "000001.npy").exists()
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    run(model, folder, resume=True)                            # the holder died: its lock is taken over
    assert f"was left by pid {holder.pid}" in capsys.readouterr().err
    assert contents(folder) == reference[0] and not (folder / LOCK_NAME).exists()


def test_lock_file_of_a_crashed_run_is_taken_over(model, tmp_path, reference, capsys):
    folder = tmp_path / "s"
    run(model, folder)
    os.remove(folder / "000002.npy")
    (folder / LOCK_NAME).write_text(json.dumps(dict(host="node7", pid=99999, started="2026-01-01T00:00:00")))
    run(model, folder, resume=True)
    assert "was left by pid 99999 on node7 (started 2026-01-01T00:00:00), which ended without releasing it" in \
        capsys.readouterr().err
    assert contents(folder) == reference[0]


def test_the_lock_is_released_when_the_run_fails(model, tmp_path):
    folder = tmp_path / "s"
    with pytest.raises(RuntimeError, match="model crashed"):
        run(_Crashes(model).eval(), folder)
    assert not (folder / LOCK_NAME).exists()
    run(model, folder, resume=True)  # and the folder is usable right away


class _Crashes(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.in_channels, self.input_size = model.in_channels, model.input_size

    def forward(self, x, t, y):
        raise RuntimeError("model crashed")


def test_check_sample_dir_says_who_holds_the_lock(tmp_path):
    from dgfast.distributed import check_sample_dir
    folder = tmp_path / "s"
    folder.mkdir()
    holder = _hold_lock(folder)
    try:
        with pytest.raises(FolderLocked, match=rf"pid {holder.pid}"):
            check_sample_dir(folder, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert check_sample_dir(folder, resume=True) == str(folder)


def test_a_warning_of_every_batch_is_shown_once(model, tmp_path):
    """sample_to_dir takes the divergence warning of each batch; the others pass on as sample() gives them."""
    import warnings
    pre = dgfast.DiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=1000)
    pre = pre.to(torch.bfloat16).eval()  # another dtype: the pair runs as two forwards, with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        sample_to_dir(model, pre, tmp_path / "s", num_samples=4, batch_size=1, num_classes=10, steps="2",
                      progress=False)
    assert [str(w.message).startswith("the fine-tuned and pre-trained models run as two forwards")
            for w in caught] == [True]
