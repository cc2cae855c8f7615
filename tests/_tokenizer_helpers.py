"""Tokenizer directories for tests, trained offline with the `tokenizers` library and saved with
transformers (tokenizer.json + tokenizer_config.json with a chat template), in the two styles
real families use:
- byte-level BPE whose post-processor adds a BOS (LLaMA 3; Qwen and GPT-2 add none);
- SentencePiece-style BPE with "▁" for spaces and <0xNN> byte-fallback tokens (LLaMA 2,
  Mistral).
"""
from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

# A template using what real ones use: a namespace, loop controls, raise_exception, a system
# message, add_generation_prompt and the special tokens.
CHAT_TEMPLATE = textwrap.dedent("""\
    {%- set ns = namespace(system='', started=false) -%}
    {{- bos_token -}}
    {%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
    {%- set ns.system = message['content'] -%}
    {%- continue -%}
    {%- endif -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
    {{- raise_exception('Conversation roles must be user or assistant') -}}
    {%- endif -%}
    {%- if ns.system and not ns.started -%}[SYS]{{ ns.system }}[/SYS]{%- endif -%}
    {%- set ns.started = true -%}
    [{{ message['role'] | upper }}] {{ message['content'] | trim }}{{ eos_token }}
    {%- endfor -%}
    {%- if add_generation_prompt -%}[ASSISTANT]{%- endif -%}""")


def _corpus() -> list[str]:
    """Text that ships with Python: the sources of a few standard modules."""
    import difflib
    import textwrap as tw
    return [inspect.getsource(m) for m in (json, difflib, tw)] + ["héllo wörld été ünïcode"]


def make_tokenizer_dir(out_dir: Path, style: str, vocab_size: int = 600) -> Path:
    """Train a tokenizer of `style` ("bytelevel" or "sentencepiece") and save it with
    transformers into out_dir (ids < vocab_size, within the test models' 1000)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "bytelevel":
        bos, eos = "<|begin_of_text|>", "<|eot_id|>"
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[bos, "<|end_of_text|>", eos],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    elif style == "sentencepiece":
        bos, eos = "<s>", "</s>"
        trained = Tokenizer(models.BPE(unk_token="<unk>"))
        trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
        trained.train_from_iterator(_corpus(), trainers.BpeTrainer(
            vocab_size=vocab_size - 256, special_tokens=["<unk>", bos, eos]))
        model = json.loads(trained.to_str())["model"]
        # LLaMA 2's layout: specials, the 256 byte tokens, then the pieces.
        vocab = {"<unk>": 0, bos: 1, eos: 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
        for piece in model["vocab"]:
            vocab.setdefault(piece, len(vocab))
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                  for m in model["merges"]]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                   byte_fallback=True, fuse_unk=True))
        tok.normalizer = trained.normalizer
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tok.add_special_tokens(["<unk>", bos, eos])
    else:
        raise ValueError(style)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out_dir)
    return out_dir
