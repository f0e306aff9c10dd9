"""The checkout's kernels/ folder is dgfast.kernels only: run from the checkout's root (which puts
the root on sys.path), `import kernels` must reach the distribution of that name (Hugging Face's
`kernels`, which transformers >= 5.25 imports through diffusers and peft) or fail as if the folder
were not there. A fresh CI venv once collected no diffusers test because transformers found
kernels/__init__.py instead."""
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


def test_without_the_distribution_kernels_is_not_found():
    out = run_from_root("import kernels", "-S")  # -S: no site-packages, so no distribution of that name
    assert out.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr
