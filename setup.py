"""dgfast: the Python package, the Triton kernels (kernels/ -> dgfast.kernels) and the C++ CPU ops
(csrc/ -> dgfast._C).

The C++ ops are optional: they are built when torch imports and a C++ compiler is found, and a
failed build is skipped with one warning line; dgfast then JIT-builds them at first use from a
source checkout, or runs the torch path. Install with `pip install --no-build-isolation [-e] .`
so the ops build against the torch you run (build isolation would hide it, or fetch another one).
DGFAST_NO_JIT=1 (no compiling of the C++ ops, as at run time) installs without them.
"""
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.develop import develop

ROOT = Path(__file__).resolve().parent
BUILD = runpy.run_path(str(ROOT / "dgfast" / "_build.py"))  # flags and sources, shared with the JIT build
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "dgfast" / "__init__.py").read_text()).group(1)


def warn(msg):
    # pip runs setup.py several times (metadata, then the build): say it once, where it matters.
    if {"build_ext", "bdist_wheel", "editable_wheel", "develop", "install"} & set(sys.argv):
        print(f"WARNING: dgfast: {msg}", file=sys.stderr)


def cpp_extension():
    """(ext_modules, cmdclass) for dgfast._C, or empty ones (with one warning) when it can't be built."""
    if os.environ.get("DGFAST_NO_JIT") == "1":
        warn("DGFAST_NO_JIT=1: installing without the C++ ops")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warn("torch is not importable at build time (build isolation? use pip install --no-build-isolation); "
             "installing without the C++ ops")
        return [], {}
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        warn(f"no C++ compiler ({cxx}) found; installing without the C++ ops")
        return [], {}

    class OptionalBuild(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # the package still works without dgfast._C (JIT or torch path)
                first = str(err).splitlines()[0] if str(err) else ""
                warn(f"building the C++ ops failed ({type(err).__name__}: {first}); "
                     f"installing without them")
                self.extensions = []

    class Develop(develop):
        # pip < 25 installs a project without pyproject.toml in editable mode through `setup.py develop`,
        # and setuptools' develop re-runs pip *with* build isolation, where torch is missing. Build the
        # ops in place first, here, where torch is; the editable install then finds dgfast/_C*.so.
        def run(self):
            self.reinitialize_command("build_ext", inplace=1)
            self.run_command("build_ext")
            super().run()

    os.environ.setdefault("MAX_JOBS", "2")
    ext = CppExtension("dgfast._C", [f"csrc/{s}" for s in BUILD["SOURCES"]],
                       extra_compile_args={"cxx": BUILD["CXX_FLAGS"]}, extra_link_args=BUILD["LD_FLAGS"])
    return [ext], {"build_ext": OptionalBuild, "develop": Develop}


ext_modules, cmdclass = cpp_extension()

setup(
    name="dgfast",
    version=VERSION,
    description="Fast, faithful Domain Guidance (DoG) sampling for DiT diffusion transformers",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dgfast", "dgfast.*"]) + ["dgfast.kernels"],
    package_dir={"dgfast.kernels": "kernels"},
    package_data={"dgfast.zoo": ["*.safetensors", "*.json", "*.md"]},
    # torch 2.4: torch.load's allow-list (safe_globals), which loads upstream train.py checkpoints
    # (an argparse.Namespace inside) without an unsafe full-pickle load
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors", "pillow"],
    extras_require={
        # triton: the kernels' tests run under its interpreter (TRITON_INTERPRET=1) without a GPU;
        # matplotlib: bench/frontier.py's plot only (imported where it is drawn)
        "dev": ["pytest", "pytest-benchmark", "pybind11", "ninja", "numpy", "pillow", "tqdm", "safetensors", "ruff",
                "scikit-learn", "triton>=3.0", "matplotlib"],
        "triton": ["triton>=3.0"],
        "diffusers": ["diffusers", "peft"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["dgfast = dgfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
