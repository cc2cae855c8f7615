"""OPT hyper-parameters: the released sizes (configs/opt.toml) and Hugging Face config.json."""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

from dsjax.config_files import CONFIG_DIR


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_dim: int
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 0  # 0 means equal to hidden_size (no project_in/out)
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    name: str = "opt"

    def __post_init__(self):
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")

    # OPT's learned position table has two extra rows: position p is row p + 2.
    POSITION_OFFSET = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    def num_params(self) -> int:
        h, f, e, v = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim, self.vocab_size
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        total = self.num_hidden_layers * per_layer + v * e + (self.max_position_embeddings + 2) * h
        if self.has_projections:
            total += 2 * h * e
        if self.has_final_layer_norm:
            total += 2 * h
        return total

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.hidden_size * dtype_bytes

    @classmethod
    def from_name(cls, name: str) -> "OPTConfig":
        table = known_sizes()
        key = name.lower().removeprefix("facebook/")
        if key not in table:
            raise ValueError(
                f"unknown OPT size {name!r}; known sizes: {', '.join(table)} "
                f"(or pass a Hugging Face model directory)")
        return cls(name=key, **table[key])

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "opt") -> "OPTConfig":
        arch = d.get("model_type")
        if arch != "opt":
            raise ValueError(
                f"config.json describes model_type {arch!r}, not 'opt': dsjax serves OPT models only")
        if d.get("activation_function", "relu") != "relu":
            raise ValueError(f"unsupported activation_function {d['activation_function']!r}: OPT uses relu")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: d[k] for k in fields if k in d and d[k] is not None}
        kw.pop("name", None)
        # HF spells the no-final-LN switch with a leading underscore.
        if d.get("_remove_final_layer_norm"):
            kw["remove_final_layer_norm"] = True
        return cls(name=name, **kw)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "OPTConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{cfg_file} not found: a model directory needs the Hugging Face config.json")
        return cls.from_hf_dict(json.loads(cfg_file.read_text()), name=path.name)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("name")
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        d.update(model_type="opt", activation_function="relu", architectures=["OPTForCausalLM"])
        return d


def known_sizes() -> dict[str, dict]:
    with open(CONFIG_DIR / "opt.toml", "rb") as f:
        return tomllib.load(f)
