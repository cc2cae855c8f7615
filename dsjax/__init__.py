"""dsjax: DistServe's disaggregated prefill/decode serving on JAX/XLA."""
from dsjax.config import EngineConfig
from dsjax.engine.request import RequestOutput
from dsjax.sampling_params import SamplingParams


def __getattr__(name):
    # LLM and Engine import JAX; keep `import dsjax` light for tools that only need configs.
    if name == "LLM":
        from dsjax.llm import LLM
        return LLM
    if name == "Engine":
        from dsjax.engine.core import Engine
        return Engine
    raise AttributeError(f"module 'dsjax' has no attribute {name!r}")


__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams", "RequestOutput"]
