"""dgfast: fast, faithful Domain Guidance sampling for DiT models."""
__version__ = "0.1.0"

from dgfast import ops  # noqa: F401
from dgfast.schedule import Schedule, space_timesteps  # noqa: F401
from dgfast.checkpoint import load_checkpoint, save_safetensors  # noqa: F401,E402
from dgfast.models import DiT, DiT_models, build_model  # noqa: F401,E402
from dgfast.sampling import dog_forward, sample  # noqa: F401,E402
