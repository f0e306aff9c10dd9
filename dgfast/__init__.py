"""dgfast: fast, faithful Domain Guidance sampling for DiT models."""
__version__ = "0.1.0"

from dgfast import ops  # noqa: F401
from dgfast.schedule import Schedule, space_timesteps  # noqa: F401
