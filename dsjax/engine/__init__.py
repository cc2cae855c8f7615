"""The serving runtime's control plane: the engine front, instance workers, their messages,
schedulers and block tables. Device work lives in dsjax.executor."""
