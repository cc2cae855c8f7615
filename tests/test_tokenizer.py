"""dsjax.tokenizer: OPT-style BOS, round trips, streaming decode, GPT-2 fallback."""
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsjax.tokenizer import (OPT_SPECIAL_TOKENS, GPT2Tokenizer, IncrementalDetokenizer,
                             gpt2_tokenizer, load_tokenizer)

TEXTS = [
    "Hello world, this is a test.",
    "naïve café: 日本語のテキスト 🙂🚀 and 中文 too",
    "  spaces\tand\nnewlines  ",
    "emoji runs 👩‍👩‍👧🏳️‍🌈 end",
]


@pytest.fixture(scope="module")
def trained():
    """A byte-level BPE trained on a few sentences; OPT's special tokens take ids 0..3."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(OPT_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 5, trainer)
    return tok


@pytest.fixture(scope="module")
def json_dir(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_json")
    trained.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def vocab_merges_dir(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_bpe")
    trained.model.save(str(d))
    return d


@pytest.fixture(params=["json", "vocab_merges"])
def opt_tok(request, json_dir, vocab_merges_dir):
    return load_tokenizer(json_dir if request.param == "json" else vocab_merges_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_prepends_bos_to_the_bpe_ids(opt_tok, trained, text):
    ids = opt_tok.encode(text)
    assert ids[0] == opt_tok.bos_token_id == 2
    assert ids[1:] == trained.encode(text).ids
    assert opt_tok.encode(text, add_bos=False) == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_and_matches_tokenizers(opt_tok, trained, text):
    ids = opt_tok.encode(text)
    assert opt_tok.decode(ids) == text
    assert opt_tok.decode(ids) == trained.decode(ids, skip_special_tokens=True)


def test_special_tokens(opt_tok, trained):
    assert opt_tok.eos_token_id == 2
    assert opt_tok.vocab_size == trained.get_vocab_size()
    ids = opt_tok.encode("hi") + [opt_tok.eos_token_id]
    assert opt_tok.decode(ids) == "hi"
    assert opt_tok.decode(ids, skip_special_tokens=False) == "</s>hi</s>"
    # Models pad their vocab past the tokenizer's; such ids decode to nothing, not a crash.
    assert opt_tok.decode(opt_tok.encode("hi") + [opt_tok.vocab_size + 5]) == "hi"


def test_token_strings_spell_tokens_as_tokenizers_does(opt_tok, trained):
    """convert_ids_to_tokens' spelling: byte-level stand-ins ('Ġ' for a space), specials as
    themselves; `tokenizers` is the reference."""
    assert [opt_tok.token_string(i) for i in range(trained.get_vocab_size())] == \
        [trained.id_to_token(i) for i in range(trained.get_vocab_size())]
    assert opt_tok.token_string(opt_tok.encode(" Hello", add_bos=False)[0]).startswith("Ġ")


def _stream(tok, ids):
    det = IncrementalDetokenizer(tok)
    pieces = [det.feed(i) for i in ids]
    return pieces, det.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_equals_full_decode(opt_tok, text):
    ids = opt_tok.encode(text)
    pieces, tail = _stream(opt_tok, ids)
    assert "".join(pieces) + tail == opt_tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decode_holds_back_split_characters():
    tok = gpt2_tokenizer()
    ids = tok.encode("🙂🚀日本語", add_bos=False)
    # GPT-2 splits these characters' UTF-8 bytes across tokens: decoding tokens one by one
    # would show U+FFFD halves; the streaming decoder must wait for whole characters.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) == "🙂🚀日本語" and tail == ""
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some token completed no character
    # A stream cut inside a character reports the unfinished character on flush.
    pieces, tail = _stream(tok, ids[:1])
    assert pieces == [""] and tail == "\ufffd"


def test_gpt2_fallback_ids_and_lengths(tmp_path):
    tok = load_tokenizer(tmp_path)  # no tokenizer files here
    assert isinstance(tok, GPT2Tokenizer)
    assert load_tokenizer(None) is tok
    # Well-known GPT-2 ids ("Hello"=15496, " world"=995) after OPT's BOS.
    assert tok.encode("Hello world") == [2, 15496, 995]
    assert tok.vocab_size == 50257
    for text in TEXTS:
        ids = tok.encode(text)
        assert len(ids) == len(tok.encode(text, add_bos=False)) + 1
        assert tok.decode(ids) == text
    # Only a leading 2 is BOS: elsewhere it is GPT-2's '#'.
    assert tok.decode(tok.encode("#a#")) == "#a#"
    assert tok.decode([50256, 15496], skip_special_tokens=False) == "<|endoftext|>Hello"
    assert [tok.token_string(i) for i in (15496, 995, 50256)] == ["Hello", "Ġworld",
                                                                 "<|endoftext|>"]


def test_no_tokenizer_files_without_fallback(tmp_path):
    assert load_tokenizer(tmp_path, fallback=None) is None
    with pytest.raises(ValueError, match="fallback"):
        load_tokenizer(tmp_path, fallback="llama")
