"""Model families in Flax and their weight loading. Knows nothing of scheduling or serving.

models/base.py is the interface every family declares (config, params, checkpoint tensor
names, tensor-parallel rules, KV heads, sizes); models/registry.py finds a family by
config.json's model_type or by a size name. Imported as dsjax.models: a wheel installs it
there."""
from dsjax.config_files import CONFIG_DIR
from dsjax.models.base import ModelConfig
from dsjax.models.registry import FAMILIES, config_from_dir, config_from_name, known_sizes

__all__ = ["CONFIG_DIR", "FAMILIES", "ModelConfig", "config_from_dir", "config_from_name",
           "known_sizes"]
