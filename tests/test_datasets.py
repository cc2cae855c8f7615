"""dsjax.eval.workloads and `python -m serving.datasets`: preparation rules, files, sampling."""
import json
import logging
import pickle
import random

import pytest

from dsjax.eval import workloads as dsmod
from dsjax.eval.workloads import (Dataset, TestRequest, get_dataset, iter_json_list, load_dataset,
                            prepare_humaneval, prepare_longbench, prepare_sharegpt, save_dataset,
                            sharegpt_requests)
from dsjax.tokenizer import gpt2_tokenizer
from serving import datasets as cli
from tests._bench_helpers import FIXTURES


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


class LengthTableTokenizer:
    """encode(text) has the length the test assigns to that text."""

    def __init__(self, lengths: dict[str, int]):
        self.lengths = lengths

    def encode(self, text):
        return [0] * self.lengths[text]

    def decode(self, ids):
        return ""


def conv(*values):
    return {"conversations": [{"from": "x", "value": v} for v in values]}


# ---------------------------------------------------------------- ShareGPT

def test_truncated_json_list_recovers_complete_elements(caplog):
    text = (FIXTURES / "sharegpt_truncated.json").read_text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert [c["id"] for c in iter_json_list(text)] == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert list(iter_json_list('[{"a": 1} , [2,3],\n "x" ]')) == [{"a": 1}, [2, 3], "x"]
    assert list(iter_json_list("[]")) == []
    with caplog.at_level(logging.WARNING, logger="dsjax.eval.workloads"):
        convs = dsmod.read_sharegpt_conversations(FIXTURES / "sharegpt_truncated.json")
    assert len(convs) == 6 and "recovered 6 complete conversations" in caplog.text


def test_sharegpt_drop_rules_at_their_boundaries():
    # Every conversation has 3 turns [A, B, C]: whichever k in {1, 2} is drawn, the lengths are
    # the same, so the outcome does not depend on the random draw.
    def lengths(a, b, c):
        return {"A": a, "B": b, "A\nB": a, "C": c}

    cases = {"tiny (both < 4)": (lengths(3, 3, 3), False),
             "output 4": (lengths(3, 4, 4), True),
             "total 2048": (lengths(1000, 1048, 1048), False),
             "total 2047": (lengths(1000, 1047, 1047), True)}
    for name, (table, kept) in cases.items():
        reqs = sharegpt_requests([conv("A", "B", "C")], LengthTableTokenizer(table))
        assert (len(reqs) == 1) == kept, name
    assert sharegpt_requests([conv("A", "B")], LengthTableTokenizer({})) == []  # < 3 turns


def test_sharegpt_fixture_prompt_is_first_k_turns(tok):
    convs = json.loads((FIXTURES / "sharegpt_complete.json").read_text())
    reqs = prepare_sharegpt(FIXTURES / "sharegpt_complete.json", tok, seed=0).reqs
    # c0, c4 and c5 survive; c1 has two turns, c2 is tiny, c3 too long.
    # One draw per conversation of >= 3 turns, taken before the length filters (as the artifact).
    rng = random.Random(0)
    expected = []
    for c in convs:
        turns = [t["value"] for t in c["conversations"]]
        if len(turns) < 3:
            continue
        k = rng.randint(1, min(len(turns) - 1, 1000))
        if c["id"] in ("c0", "c4", "c5"):
            expected.append(TestRequest("\n".join(turns[:k]), len(tok.encode("\n".join(turns[:k]))),
                                        len(tok.encode(turns[k]))))
    assert reqs == expected
    assert all(r.prompt_len == len(tok.encode(r.prompt)) for r in reqs)
    # the truncated copy of the same file gives the same requests
    assert prepare_sharegpt(FIXTURES / "sharegpt_truncated.json", tok).reqs == expected
    assert prepare_sharegpt(FIXTURES / "sharegpt_complete.json", tok, seed=1).reqs != expected


def test_full_bundled_sharegpt_matches_the_published_figures(tok):
    # DISTSERVE.md: 17,671 recoverable conversations give 12,088 requests, means 767.1 / 198.8.
    ds = prepare_sharegpt(None, tok)
    prompt_mean, output_mean = ds.mean_lengths()
    assert len(ds.reqs) == 12088
    assert (round(prompt_mean, 1), round(output_mean, 1)) == (767.1, 198.8)


# ---------------------------------------------------------------- HumanEval, LongBench

def test_humaneval_rules_on_fixture(tok):
    ds = prepare_humaneval(FIXTURES / "humaneval_mini.jsonl", tok)
    problems = [json.loads(line) for line in (FIXTURES / "humaneval_mini.jsonl").read_text().splitlines()]
    kept = [TestRequest(p["prompt"], len(tok.encode(p["prompt"])), len(tok.encode(p["canonical_solution"])))
            for p in problems[:2]]                 # the third is over 2048 tokens
    assert ds.name == "humaneval" and ds.reqs == kept * 10


def test_full_bundled_humaneval_matches_the_published_figures(tok):
    ds = prepare_humaneval(None, tok)
    prompt_mean, output_mean = ds.mean_lengths()
    assert len(ds.reqs) == 1640
    assert (round(prompt_mean, 1), round(output_mean, 1)) == (171.3, 98.2)


def test_longbench_cuts_context_to_the_drawn_budget(tok):
    ds = prepare_longbench(FIXTURES / "longbench", tok, seed=0)
    records = [json.loads(line) for line in (FIXTURES / "longbench" / "mini.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    for req, rec in zip(ds.reqs, records, strict=True):
        answer_len = len(tok.encode(rec["answers"][0]))
        full_len = len(tok.encode(rec["context"][:40_000]))
        budget = min(2040 - answer_len, rng.randint(1900, 2048))
        assert req.output_len == answer_len
        assert req.prompt_len == min(full_len, budget)
        assert not req.prompt.startswith("</s>")
        assert rec["context"].startswith(req.prompt[:200])
    assert ds.reqs[1].prompt == records[1]["context"]          # short context kept whole
    assert ds.reqs[2].prompt_len <= 2040 - ds.reqs[2].output_len
    with pytest.raises(FileNotFoundError, match="jsonl"):
        prepare_longbench(FIXTURES / "exp", tok)


# ---------------------------------------------------------------- files and sampling

def test_json_round_trip(tmp_path):
    ds = Dataset("mine", [TestRequest("hi ünïcode", 3, 4), TestRequest("b", 2, 9)])
    save_dataset(ds, tmp_path / "d" / "mine.json")
    raw = json.loads((tmp_path / "d" / "mine.json").read_text())
    assert raw == {"dataset_name": "mine", "reqs": [["hi ünïcode", 3, 4], ["b", 2, 9]]}
    assert load_dataset(tmp_path / "d" / "mine.json") == ds


@pytest.mark.parametrize("name", ["distserve_simulator_utils.ds", "structs.ds",
                                  "structs_protocol0.ds", "marshal.ds"])
def test_distserve_ds_files_load(name):
    ds = load_dataset(FIXTURES / name)
    assert ds == Dataset("sharegpt-mini", [TestRequest("Hello there", 3, 7),
                                           TestRequest("Write a poem about the sea", 7, 120)])


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_pickles_of_other_classes_are_refused(tmp_path):
    path = tmp_path / "evil.ds"
    path.write_bytes(pickle.dumps({"dataset_name": "x", "reqs": [Evil()]}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset(path)
    (tmp_path / "junk.ds").write_bytes(b"\x00\x01not a dataset")
    with pytest.raises(ValueError, match="not a dataset"):
        load_dataset(tmp_path / "junk.ds")


def test_sample_is_seeded_distinct_and_bounded():
    ds = Dataset("n", [TestRequest(str(i), i, i) for i in range(50)])
    picked = ds.sample(20)
    assert picked == random.Random(0).sample(ds.reqs, 20)   # the artifact's client draw
    assert picked == ds.sample(20, seed=0) != ds.sample(20, seed=1)
    assert len(set(picked)) == 20
    with pytest.raises(ValueError, match="at most 50"):
        ds.sample(51)


def test_get_dataset_by_path_and_cached_name(tmp_path, monkeypatch, tok):
    path = tmp_path / "d.json"
    save_dataset(Dataset("d", [TestRequest("a", 2, 2)]), path)
    assert get_dataset(str(path)).name == "d"
    with pytest.raises(FileNotFoundError, match="serving.datasets"):
        get_dataset(str(tmp_path / "missing.json"))

    monkeypatch.setattr(dsmod, "CACHE_DIR", tmp_path / "cache")
    first = get_dataset("humaneval", tok)
    assert (tmp_path / "cache" / "humaneval.json").exists() and len(first.reqs) == 1640
    monkeypatch.setitem(dsmod._PREPARERS, "humaneval", lambda _: pytest.fail("cache not used"))
    assert get_dataset("humaneval") == first


def test_cli_prepares_and_reports(tmp_path, capsys):
    out = tmp_path / "he.json"
    assert cli.main(["--dataset", "humaneval", "--input", str(FIXTURES / "humaneval_mini.jsonl"),
                     "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "humaneval: 20 requests" in printed and "mean input" in printed
    assert len(load_dataset(out).reqs) == 20
    assert cli.main(["--dataset", "file", "--input", str(FIXTURES / "structs.ds"),
                     "--output", str(out)]) == 0
    assert load_dataset(out).name == "sharegpt-mini"
