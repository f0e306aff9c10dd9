"""dgfast: fast, faithful Domain Guidance sampling for DiT models.

    eps = eps_pre(x, t, null) + w * (eps_ft(x, t, y) - eps_pre(x, t, null))
"""
__version__ = "0.1.0"

from dgfast import ops  # noqa: F401
from dgfast.adapters import to_dgfast  # noqa: F401
from dgfast.convert import report as conversion_report  # noqa: F401
from dgfast.checkpoint import load_checkpoint, save_safetensors  # noqa: F401
from dgfast.distributed import make_npz, sample_to_dir  # noqa: F401
from dgfast.models import DiT, DiT_models, build_model  # noqa: F401
from dgfast.pair_cache import get_pair  # noqa: F401
from dgfast.paired import pair  # noqa: F401
from dgfast.api import dog_forward, sample  # noqa: F401
from dgfast.schedule import Schedule, space_timesteps  # noqa: F401

# diffusers is optional (pip install dgfast[diffusers]): import those names on first use.
_LAZY = {"DoGDiTPipeline": "dgfast.diffusers_pipeline", "DomainGuidance": "dgfast.guiders"}


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "zoo":  # `dgfast.zoo.load_pair()` without importing dgfast.zoo first
        return importlib.import_module("dgfast.zoo")
    raise AttributeError(f"module 'dgfast' has no attribute {name!r}")
