"""The name `kernels` from a checkout's root (which `python -m` puts on sys.path): `import kernels`
must reach the distribution of that name (Hugging Face's `kernels`, which transformers >= 5.25
imports through diffusers and peft), and without one stay the folder it always was under that
name. A fresh CI venv once collected no diffusers test because transformers found
kernels/__init__.py instead of the distribution."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_distribution_named_kernels_wins_over_the_folder(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'the distribution'\n")
    # the stand-in goes right after the root, ahead of site-packages (which may hold the real one)
    code = (f"import sys; assert sys.path[0] == ''; sys.path.insert(1, {str(tmp_path / 'site')!r})\n"
            "from kernels import CUDAProperties; print(CUDAProperties)\n"
            "import dgfast.kernels as k; print(k.__name__, k.guided_step.__name__)")
    out = run_from_root(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["the distribution", "dgfast.kernels guided_step"], out.stdout


def test_without_the_distribution_kernels_stays_the_folder(tmp_path):
    """No usable distribution (a stand-in that fails to import, ahead of site-packages, which may
    hold the real one): `import kernels` gives the folder, as before, which transformers 5.24 imports
    only to read a version."""
    broken = tmp_path / "site" / "kernels"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('stand-in for a missing distribution')\n")
    code = (f"import sys; assert sys.path[0] == ''; sys.path.insert(1, {str(tmp_path / 'site')!r})\n"
            "import kernels; print(kernels.__name__, kernels.guided_step.__name__)")
    out = run_from_root(code)
    assert out.returncode == 0 and out.stdout.strip() == "kernels guided_step", out.stderr
