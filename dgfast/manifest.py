"""manifest.json of a `dgfast sample` folder: the settings that determine the output (checked on
resume, so that a resumed run cannot mix two sample sets), one entry per run, and at the end of a
run the sample files' checksums (dgfast/sample_dir.py checks files against them).
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch

from dgfast.sample_dir import write_atomic

MANIFEST = "manifest.json"


def folder_manifest(sample_dir: str) -> dict:
    """The manifest of `sample_dir`, or {} when it has none (an error if it is damaged)."""
    return read_manifest(os.path.join(sample_dir, MANIFEST)) or {}


def _versions() -> dict:
    import dgfast
    return {"dgfast": getattr(dgfast, "__version__", "unknown"), "torch": torch.__version__}


def write_manifest(sample_dir: str, settings: dict, info: dict) -> None:
    """manifest.json: the output-determining settings (checked on resume) plus one entry per run."""
    path = os.path.join(sample_dir, MANIFEST)
    old = read_manifest(path) or {}
    run = dict(info, command=sys.argv, started=datetime.datetime.now().isoformat(timespec="seconds"),
               **_versions())
    manifest = dict(settings=settings, versions=_versions(), runs=old.get("runs", []) + [run])
    if "files" in old or not old:  # a new folder has checksums from its start; an older folder from its end
        manifest["files"] = old.get("files", {})
    _write(path, manifest)


def record_checksums(sample_dir: str, checksums: dict) -> None:
    """Store the sample files' checksums in manifest.json (the end of a run: all files verified); files
    beyond this run's num_samples keep theirs."""
    path = os.path.join(sample_dir, MANIFEST)
    manifest = read_manifest(path)
    manifest["files"] = dict(sorted({**manifest.get("files", {}), **checksums}.items()))
    _write(path, manifest)


def _write(path: str, manifest: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=2, default=str).encode()))


def read_manifest(path: str) -> dict | None:
    """The manifest, or None if there is none; a damaged one is an error naming the file (resuming
    without knowing the settings could mix runs)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({err}): the run's settings are unknown, so it cannot be "
                         f"resumed; use a new directory") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise ValueError(f"{path} has no 'settings' object: not a dgfast manifest, so the run cannot be "
                         f"resumed; use a new directory")
    return manifest


def read_settings(sample_dir) -> dict | None:
    """The settings recorded in sample_dir's manifest.json (None without one; an error if damaged)."""
    manifest = read_manifest(os.path.join(os.fspath(sample_dir), MANIFEST))
    return manifest["settings"] if manifest is not None else None


def check_resume(sample_dir: str, settings: dict) -> None:
    """A resumed folder must have been started with the same output-determining settings."""
    if not os.path.isdir(sample_dir) or not os.listdir(sample_dir):
        return
    old = read_manifest(os.path.join(sample_dir, MANIFEST))
    if old is None:
        raise FileExistsError(f"cannot resume {sample_dir}: it has no {MANIFEST}, so it was not written by dgfast")
    # through JSON so that tuples/lists and the like compare as they were stored
    new = json.loads(json.dumps(settings, default=str))
    diffs = _setting_diffs(old["settings"], new)
    if diffs:
        raise ValueError(f"cannot resume {sample_dir}: it was started with other settings ({'; '.join(diffs)}); "
                         f"mixing them would corrupt the sample set, use a new directory")


# settings older manifests lack (a folder started before dgfast recorded them: nothing to compare)
ADDED_LATER = {"ckpt_weights", "pretrained_weights", "ckpt_sha256", "pretrained_sha256", "backend", "exact", "compile"}


def _setting_diffs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for each differing setting; nested dicts (run_config) name the inner key,
    so the message shows the one flag that changed, not the whole dict."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in ADDED_LATER and k not in old:  # a folder started before dgfast recorded it: unknown
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _setting_diffs(a, b, f"{prefix}{k}.")
        elif a != b and not _same_file(a, b):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _same_file(a, b) -> bool:
    """Two spellings of one existing file (relative vs absolute, symlinks): the same checkpoint."""
    return (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
            and os.path.realpath(a) == os.path.realpath(b))
