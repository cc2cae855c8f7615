"""The paper reproduction's synthetic LongBench lengths and its doc writer."""
import numpy as np
import pytest

from benchmarks.paper_workloads import LONGBENCH_MEANS, longbench_like
from benchmarks.reproduce_paper import MARKER, write_doc


def test_synthetic_longbench_has_distserves_stated_means_and_the_artifacts_cut():
    reqs = longbench_like(20_000, seed=3)
    prompts = np.array([r.prompt_len for r in reqs])
    outputs = np.array([r.output_len for r in reqs])
    assert prompts.mean() == pytest.approx(LONGBENCH_MEANS[0], rel=0.01)   # 1738.3
    assert outputs.mean() == pytest.approx(LONGBENCH_MEANS[1], rel=0.03)   # 90.7, a heavy tail
    assert (prompts + outputs).max() <= 2040 and prompts.min() >= 1 and outputs.min() >= 1
    assert np.mean(prompts >= 1900) > 0.5          # most contexts are longer than the cut


def test_doc_keeps_the_prose_and_replaces_the_tables(tmp_path):
    doc = tmp_path / "reproduction.md"
    doc.write_text(f"# Title\n\nprose\n\n{MARKER}\n\nold table\n")
    write_doc(doc, [("Section", "| a |\n|---|")])
    text = doc.read_text()
    assert text.startswith("# Title\n\nprose\n\n" + MARKER)
    assert "old table" not in text and "### Section\n\n| a |" in text
