"""OPT's tokenizer (byte-level BPE), a GPT-2 fallback for length counting, and streaming decode.

Both backends expose each token as raw bytes, so decoding is bytes -> UTF-8 in one place and
the streaming detokenizer can hold back a character split across tokens instead of emitting
U+FFFD halves.
"""
from __future__ import annotations

import base64
import codecs
import functools
import logging
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


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` byte-level BPE (OPT's own vocab)."""

    def __init__(self, tok):
        import tokenizers

        self._tok = tok
        # Give OPT's special tokens special status (vocab.json lists them as plain entries);
        # ones the vocab lacks get appended ids.
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in OPT_SPECIAL_TOKENS])
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        vocab = tok.get_vocab(with_added_tokens=True)
        table = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            # Byte-level tokens spell bytes with printable stand-ins; anything else is literal.
            if all(c in byte_of for c in token):
                table[i] = bytes(byte_of[c] for c in token)
            else:
                table[i] = token.encode("utf-8")
        bos = tok.token_to_id(OPT_BOS)
        super().__init__(table, bos_token_id=bos, eos_token_id=bos, special_ids=special)

    def encode_plain(self, text):
        # add_special_tokens=False: a tokenizer.json post-processor must not add a second BOS.
        return self._tok.encode(text, add_special_tokens=False).ids


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


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> GPT2Tokenizer:
    """The shipped GPT-2 BPE with OPT's BOS (shared: tokenizers here are stateless)."""
    return GPT2Tokenizer()


def load_tokenizer(path: str | Path | None, fallback: str | None = "gpt2") -> Tokenizer | None:
    """OPT's tokenizer from a model directory (tokenizer.json, or vocab.json + merges.txt);
    without those files the GPT-2 fallback (fallback='gpt2') or None (fallback=None)."""
    import tokenizers

    if fallback not in ("gpt2", None):
        raise ValueError(f"unknown tokenizer fallback {fallback!r}: use 'gpt2' or None")
    directory = Path(path) if path is not None else None
    if directory is not None and (directory / "tokenizer.json").is_file():
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")))
    if directory is not None and (directory / "vocab.json").is_file() \
            and (directory / "merges.txt").is_file():
        model = tokenizers.models.BPE.from_file(str(directory / "vocab.json"),
                                                str(directory / "merges.txt"))
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        return HFTokenizer(tok)
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
