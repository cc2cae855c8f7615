"""The model families dsjax serves, found by Hugging Face `model_type` or by size name.

    config_from_dir(path)    config.json -> the family's config (model_type picks the family)
    config_from_name(name)   a size name from configs/<family>.toml (dummy weights)
    known_sizes()            every size name, with its family

Adding a family: one module in models/ with its config class, listed in FAMILIES, and its
sizes in a configs/ table.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from pathlib import Path

from dsjax.config_files import CONFIG_DIR
from dsjax.models.gpt2 import GPT2Config
from dsjax.models.llama import LlamaConfig
from dsjax.models.mistral import MistralConfig
from dsjax.models.opt import OPTConfig
from dsjax.models.qwen import Qwen2Config, Qwen3Config

FAMILIES = {cls.model_type: cls for cls in (OPTConfig, LlamaConfig, MistralConfig,
                                            Qwen2Config, Qwen3Config, GPT2Config)}
# configs/ tables of named sizes; an entry's model_type picks its family (default: the file's).
SIZE_TABLES = {"opt.toml": "opt", "llama.toml": "llama", "mistral.toml": "mistral",
               "qwen.toml": "qwen2", "gpt2.toml": "gpt2"}


def family(model_type: str | None):
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported by dsjax; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf_dict(d: dict, name: str):
    cls = family(d.get("model_type"))
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                and f.name != "name"]
    missing = [f for f in required if d.get(f) is None]
    if missing:
        raise ValueError(f"the config of {name} ({cls.model_type}) lacks {', '.join(missing)}: "
                         f"is its config.json complete?")
    return cls.from_hf_dict(d, name)


def config_from_dir(path: str | Path):
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} not found: a model directory needs the Hugging Face config.json")
    return config_from_hf_dict(json.loads(cfg_file.read_text()), name=path.name)


@functools.cache
def known_sizes() -> dict[str, dict]:
    """Size name -> its table entry (with model_type), from every configs/ table."""
    sizes = {}
    for file, default_type in SIZE_TABLES.items():
        table = CONFIG_DIR / file
        if not table.is_file():
            continue
        with open(table, "rb") as f:
            for name, entry in tomllib.load(f).items():
                sizes[name] = {"model_type": default_type, **entry}
    return sizes


def config_from_name(name: str):
    """A named size (dummy weights): 'opt-13b', 'llama-3.1-8b', 'qwen2.5-7b', 'gpt2-xl', ..."""
    table = known_sizes()
    key = name.lower().split("/")[-1]
    if key not in table:
        raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(table)} "
                         f"(or pass a Hugging Face model directory)")
    entry = dict(table[key])
    return family(entry.pop("model_type")).from_hf_dict(entry, name=key)
