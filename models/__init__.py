"""Model definitions in Flax and their weight loading. Knows nothing of scheduling or serving.

Imported as dsjax.models: dsjax/models links here, and a wheel installs it there."""
from dsjax.models.config import OPTConfig, CONFIG_DIR
from dsjax.models.opt import OPTModel

__all__ = ["OPTConfig", "OPTModel", "CONFIG_DIR"]
