"""Random-weight Hugging Face OPT checkpoints for tests (transformers + torch, CPU, tiny sizes)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Tiny shapes exercising each OPT variant the loader and model must get right.
TINY_HF_CONFIGS = {
    # pre-LN with a final layer norm (opt-125m and every size >= 1.3b)
    "pre_ln": dict(hidden_size=64, num_attention_heads=4, ffn_dim=128),
    # opt-350m: 48-wide embeddings projected to 96, post-LN, no final layer norm
    "proj_post_ln": dict(hidden_size=96, num_attention_heads=4, ffn_dim=192,
                         word_embed_proj_dim=48, do_layer_norm_before=False),
    # head_dim 80 like opt-2.7b
    "head_dim_80": dict(hidden_size=160, num_attention_heads=2, ffn_dim=320),
}
COMMON = dict(num_hidden_layers=2, vocab_size=1000, max_position_embeddings=128)


def make_hf_opt(kind: str, seed: int = 0):
    """An OPTForCausalLM (float32, eval) whose every tensor is random, LayerNorms and biases
    included, so a mix-up of any two tensors changes the logits."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    kw = dict(COMMON, **TINY_HF_CONFIGS[kind])
    kw.setdefault("word_embed_proj_dim", kw["hidden_size"])
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_safetensors(model, out_dir: Path, max_shard_size: str | None = None) -> Path:
    """model.safetensors (or shards + index when max_shard_size is small) + config.json."""
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kw)
    return out_dir


def _state_dict(model, prefix: str = "model.decoder.") -> dict[str, torch.Tensor]:
    # Tied lm_head is left out as transformers does; renaming reproduces old export prefixes.
    return {prefix + k.removeprefix("model.decoder."): v.detach().clone().contiguous()
            for k, v in model.state_dict().items() if not k.startswith("lm_head")}


def save_renamed_safetensors(model, out_dir: Path, prefix: str) -> Path:
    """One safetensors file whose decoder tensors carry `prefix` ('decoder.' or '')."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out_dir / "config.json")
    save_file(_state_dict(model, prefix), out_dir / "model.safetensors")
    return out_dir


def save_pytorch_bin(model, out_dir: Path, shards: int = 1) -> Path:
    """pytorch_model.bin, or `shards` pytorch_model-0000i-of-0000n.bin files + index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out_dir / "config.json")
    tensors = _state_dict(model)
    if shards == 1:
        torch.save(tensors, out_dir / "pytorch_model.bin")
        return out_dir
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n] for n in names[i::shards]}
        torch.save(part, out_dir / file)
        weight_map.update({n: file for n in part})
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out_dir


def make_varied_hf_opt(seed: int = 0, init_std: float = 0.3):
    """An OPTForCausalLM initialised by transformers itself with a large init_std, so greedy
    decoding does not settle into repeating one token: each position's choice then depends on
    the whole context, and an engine that attends to the wrong tokens gives other tokens."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(**dict(COMMON, **TINY_HF_CONFIGS["pre_ln"]), word_embed_proj_dim=64,
                       init_std=init_std)
    model = OPTForCausalLM(config).eval()
    model.generation_config.eos_token_id = None   # generate exactly max_new_tokens
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt` by exactly n tokens."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=1)
    return out[0, len(prompt):].tolist()
