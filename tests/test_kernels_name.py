"""The name `kernels` from a checkout's root (which `python -m` puts on sys.path): `import kernels`
must reach the distribution of that name (Hugging Face's `kernels`, which transformers >= 5.25
imports through diffusers and peft), and without one stay the folder it always was under that
name. A fresh CI venv once collected no diffusers test because transformers found
kernels/__init__.py instead of the distribution."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from_root(tmp_path, stand_in: str, code: str) -> subprocess.CompletedProcess:
    """Run `code` from the checkout's root with a `kernels` distribution stand-in (its __init__.py
    source) right after the root on sys.path, ahead of site-packages (which may hold the real one)."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(stand_in)
    prefix = f"import sys; assert sys.path[0] == ''; sys.path.insert(1, {str(site)!r})\n"
    return subprocess.run([sys.executable, "-c", prefix + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_distribution_named_kernels_wins_over_the_folder(tmp_path):
    out = run_from_root(tmp_path, "CUDAProperties = 'the distribution'\n",
                        "from kernels import CUDAProperties; print(CUDAProperties)\n"
                        "import dgfast.kernels as k; print(k.__name__, k.guided_step.__name__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["the distribution", "dgfast.kernels guided_step"], out.stdout


def test_without_the_distribution_kernels_stays_the_folder(tmp_path):
    """No usable distribution (a stand-in that fails to import): `import kernels` gives the folder,
    as before, which transformers 5.24 imports only to read a version."""
    out = run_from_root(tmp_path, "raise ImportError('stand-in for a missing distribution')\n",
                        "import kernels; print(kernels.__name__, kernels.guided_step.__name__)")
    assert out.returncode == 0 and out.stdout.strip() == "kernels guided_step", out.stderr
