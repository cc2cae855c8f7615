"""Tokenizers: a model directory's tokenizer.json (any family), OPT's conventions on top of it,
a GPT-2 fallback for length counting, and streaming decode.

Every backend exposes each token as raw bytes (byte-level BPE's printable stand-ins and
SentencePiece's "▁" and <0xNN> byte tokens undone), so decoding is bytes -> UTF-8 in one place
and the streaming detokenizer can hold back a character split across tokens instead of emitting
U+FFFD halves.
"""
from __future__ import annotations

import base64
import codecs
import functools
import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

GPT2_BPE_FILE = Path(__file__).resolve().parent / "data" / "gpt2.tiktoken"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"

# OPT's special tokens and their ids in its vocab. </s> is both BOS (prepended) and EOS.
OPT_SPECIAL_TOKENS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
OPT_BOS = "</s>"


class Tokenizer:
    """encode() prepends BOS like Hugging Face's OPT tokenizer; decode() skips special tokens."""

    def __init__(self, token_bytes: list[bytes], bos_token_id: int, eos_token_id: int,
                 special_ids: set[int]):
        self._token_bytes = token_bytes
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.special_ids = frozenset(special_ids)

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of text alone, no BOS."""
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.encode_plain(text)
        return [self.bos_token_id, *ids] if add_bos else ids

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """Bytes of one token; b'' for a skipped special token or an id past the vocab (models
        pad their vocab beyond the tokenizer's)."""
        if skip_special_tokens and token_id in self.special_ids:
            return b""
        return self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""

    def token_string(self, token_id: int) -> str:
        """The token as Hugging Face's convert_ids_to_tokens spells it: bytes as byte-level
        BPE's printable stand-ins ('Ġthe'), a special token as itself."""
        data = self.token_bytes(token_id, skip_special_tokens=False)
        if token_id in self.special_ids:
            return data.decode("utf-8", errors="replace")
        unicode_of = _bytes_to_unicode()
        return "".join(unicode_of[b] for b in data)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = b"".join(self.token_bytes(int(i), skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="replace")


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_table(tok) -> list[bytes]:
    """Each id's bytes. Byte-level BPE vocabularies (GPT-2, OPT, LLaMA 3, Qwen) spell bytes with
    printable stand-ins; SentencePiece ones (LLaMA 2, Mistral) write spaces as "▁" and bytes
    the pieces lack as <0xNN> tokens; added tokens are literal text."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    parts = [decoder, *(decoder.get("decoders") or [])]
    byte_level = any(d.get("type") == "ByteLevel" for d in parts)
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    added = set(tok.get_added_tokens_decoder())
    vocab = tok.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if i in added:
            table[i] = token.encode("utf-8")
        elif byte_level and all(c in byte_of for c in token):
            table[i] = bytes(byte_of[c] for c in token)
        elif not byte_level and _BYTE_TOKEN.fullmatch(token):
            table[i] = bytes([int(_BYTE_TOKEN.fullmatch(token).group(1), 16)])
        else:
            table[i] = (token if byte_level else token.replace("\u2581", " ")).encode("utf-8")
    return table


class HFTokenizer(Tokenizer):
    """A model directory's tokenizer.json (Hugging Face `tokenizers`). encode() adds what its
    post-processor adds (LLaMA's BOS; nothing for Qwen or GPT-2), as transformers does."""

    def __init__(self, tok, bos_token_id: int | None = None, eos_token_id: int | None = None):
        self._tok = tok
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        super().__init__(_token_table(tok), bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, special_ids=special)
        # SentencePiece decoders drop the space that starts a whole text ("▁Hello" alone is
        # "Hello"); a streamed continuation keeps its spaces, as vLLM's detokenizer does.
        decoder = json.loads(tok.to_str()).get("decoder") or {}
        self._strip_first_space = any(
            d.get("type") == "Strip" and d.get("start") == 1
            for d in [decoder, *(decoder.get("decoders") or [])])

    def encode_plain(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = super().decode(ids, skip_special_tokens)
        return text[1:] if self._strip_first_space and text.startswith(" ") else text


class OPTTokenizer(HFTokenizer):
    """OPT's byte-level BPE: its special tokens made special (vocab.json lists them as plain
    entries; ones the vocab lacks get appended ids) and </s> prepended as BOS, as Hugging
    Face's OPT tokenizer does."""

    def __init__(self, tok):
        import tokenizers

        tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in OPT_SPECIAL_TOKENS])
        bos = tok.token_to_id(OPT_BOS)
        super().__init__(tok, bos_token_id=bos, eos_token_id=bos)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Not the post-processor's: a tokenizer.json of OPT's must not add a second BOS.
        return Tokenizer.encode(self, text, add_bos)


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (tiktoken) with GPT-2 ids and OPT's </s> id (2) as BOS.

    OPT's BPE is GPT-2's with other ids, so lengths equal OPT's: what dataset preparation needs.
    Id 2 is also GPT-2's '#': decode() reads only a leading 2 as BOS."""

    def __init__(self, bpe_file: Path = GPT2_BPE_FILE):
        import tiktoken

        ranks = {}
        for line in bpe_file.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        eot = len(ranks)
        self._enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={GPT2_EOT: eot})
        table = [self._enc.decode_single_token_bytes(i) for i in range(eot)] + [GPT2_EOT.encode()]
        bos = OPT_SPECIAL_TOKENS[OPT_BOS]
        super().__init__(table, bos_token_id=bos, eos_token_id=bos, special_ids={eot})

    def encode_plain(self, text):
        return self._enc.encode_ordinary(text)

    def decode(self, ids, skip_special_tokens=True):
        ids = list(ids)
        if skip_special_tokens and ids[:1] == [self.bos_token_id]:
            ids = ids[1:]
        return super().decode(ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Streaming decode: feed() one token id, get the text it completes.

    A UTF-8 character split across tokens is held back until its last byte arrives, so the
    concatenated output equals decode() of all ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(int(token_id), self._skip))

    def flush(self) -> str:
        """Text still held back at the end of the stream (U+FFFD for an unfinished character)."""
        return self._utf8.decode(b"", final=True)


GPT2_VOCAB_SIZE = 50257


def model_tokenizer(tokenizer_dir, model_config) -> Tokenizer | None:
    """The tokenizer an engine serving `model_config` uses: the directory's, else GPT-2's BPE
    where the vocabulary is at least its size (OPT's is GPT-2's up to id numbering), else
    none (token ids only)."""
    fallback = "gpt2" if model_config.vocab_size >= GPT2_VOCAB_SIZE else None
    return load_tokenizer(tokenizer_dir, fallback=fallback, model_type=model_config.model_type)


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> GPT2Tokenizer:
    """The shipped GPT-2 BPE with OPT's BOS (shared: tokenizers here are stateless)."""
    return GPT2Tokenizer()


def _special_token_ids(directory: Path, tok) -> tuple[int | None, int | None]:
    """BOS and EOS ids from tokenizer_config.json's names (a string or {"content": ...})."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}

    def token_id(name):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if isinstance(value, str) else None
    return token_id("bos_token"), token_id("eos_token")


def load_tokenizer(path: str | Path | None, fallback: str | None = "gpt2",
                   model_type: str = "opt") -> Tokenizer | None:
    """A model directory's tokenizer (tokenizer.json, or vocab.json + merges.txt): OPT's
    conventions for model_type "opt", the file's own for every other family; without those
    files the GPT-2 fallback (fallback='gpt2') or None (fallback=None)."""
    import tokenizers

    if fallback not in ("gpt2", None):
        raise ValueError(f"unknown tokenizer fallback {fallback!r}: use 'gpt2' or None")
    directory = Path(path) if path is not None else None
    tok = None
    if directory is not None and (directory / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif directory is not None and (directory / "vocab.json").is_file() \
            and (directory / "merges.txt").is_file():
        model = tokenizers.models.BPE.from_file(str(directory / "vocab.json"),
                                                str(directory / "merges.txt"))
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
    if tok is not None:
        if model_type == "opt":
            return OPTTokenizer(tok)
        return HFTokenizer(tok, *_special_token_ids(directory, tok))
    if fallback is None:
        return None
    logger.info("no tokenizer files in %s: using the GPT-2 BPE fallback", path)
    return gpt2_tokenizer()


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
