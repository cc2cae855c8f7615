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


def hf_greedy(model, prompt: list[int], n: int, **generate_kwargs) -> list[int]:
    """transformers' greedy continuation of `prompt` by exactly n tokens (generate_kwargs:
    e.g. a repetition_penalty)."""
    # An explicit mask: generate() takes tokens equal to pad_token_id for padding otherwise.
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=1, **generate_kwargs)
    return out[0, len(prompt):].tolist()


# Random-weight checkpoints of the other families, each with its own features switched on.
# Tiny: 2 layers, hidden 64, vocab 1000, contexts up to 128 tokens.
FAMILY_COMMON = dict(num_hidden_layers=2, vocab_size=1000, max_position_embeddings=128,
                     hidden_size=64, intermediate_size=128, num_attention_heads=4)
FAMILY_KINDS = {
    # GQA (2 KV heads for 4 query heads), llama3 RoPE scaling whose original context (16) the
    # prompts run past, an untied LM head
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=dict(
            rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
    # linear RoPE scaling, one KV head (tensor parallelism of 2 or 4 replicates it)
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, rope_scaling=dict(rope_type="linear", factor=2.0))),
    # a sliding window shorter than the prompts
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_key_value_heads=2, sliding_window=8, head_dim=16)),
    # QKV biases, tied embeddings
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False)),
    # QK-norm, an explicit head_dim (32, not hidden / heads = 16)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
}


def make_hf_family(kind: str, seed: int = 0, init_range: float = 0.15):
    """A random-weight transformers model of `kind` (FAMILY_KINDS or "gpt2"), float32, eval,
    initialised with a large range so greedy tokens depend on the whole context; norms and
    biases random too, so a mix-up of any two tensors changes the logits."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000,
                                         n_positions=128, initializer_range=init_range,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config_cls, model_cls, extra = FAMILY_KINDS[kind]
        config = getattr(transformers, config_cls)(**FAMILY_COMMON, **extra,
                                                   initializer_range=init_range,
                                                   bos_token_id=0, eos_token_id=1)
        model = getattr(transformers, model_cls)(config)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None   # generate exactly max_new_tokens
    return model
