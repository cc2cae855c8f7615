"""Tokenizers and chat templates of the other families, against transformers on the same files.

The directories are trained offline (tests/_tokenizer_helpers.py) in the two styles real
checkpoints use: byte-level BPE with a BOS-adding post-processor (LLaMA 3; Qwen), and
SentencePiece-style BPE with byte fallback (LLaMA 2, Mistral)."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dsjax.tokenizer import IncrementalDetokenizer, load_tokenizer
from serving.chat_template import ChatTemplateError, load_chat_template
from tests._tokenizer_helpers import make_tokenizer_dir

TEXTS = ["Hello world", "  leading spaces and\ttabs\nnew lines\n\n", "héllo wörld été ünïcode",
         "emoji 🦀 and CJK 漢字 (bytes the vocabulary lacks)", "def f(x):\n    return x + 1"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def tokenizer_dir(request, tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)


def test_encode_and_decode_equal_transformers(tokenizer_dir):
    ours = load_tokenizer(tokenizer_dir, fallback=None, model_type="llama")
    theirs = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert ours.bos_token_id == theirs.bos_token_id and ours.eos_token_id == theirs.eos_token_id
    for text in TEXTS:
        for special in (True, False):
            ids = theirs(text, add_special_tokens=special).input_ids
            assert ours.encode(text, add_bos=special) == ids, (text, special)
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        # Streaming after a prompt: the pieces join into the continuation's text.
        detok = IncrementalDetokenizer(ours)
        streamed = "".join(detok.feed(i) for i in ids) + detok.flush()
        assert streamed.strip() == theirs.decode(ids, skip_special_tokens=True).strip()


def test_chat_template_renders_as_transformers(tokenizer_dir):
    theirs = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = load_chat_template(None, tokenizer_dir)
    for messages in (MESSAGES, MESSAGES[1:2]):
        for prompt in (True, False):
            assert template.render(messages, add_generation_prompt=prompt) == \
                theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    with pytest.raises(ChatTemplateError, match="roles must be user or assistant"):
        template.render([{"role": "tool", "content": "x"}])
