"""serving.analysis and serving.plots: goodput, SLO scale, SLO config, figures from .exp files."""
import math
import shutil

import pytest

from dsjax.eval.results import FailedRequest, RequestResult, save_exp, save_failures
from serving import analysis
from tests._bench_helpers import FIXTURES


def result(ftl: float, tpot: float) -> RequestResult:
    return RequestResult.from_timestamps(10, 3, 0.0, [ftl, ftl + tpot, ftl + 2 * tpot])


def test_goodput_interpolates_across_the_first_drop():
    # 0.95 at rate 2 and 0.85 at rate 3: 90% is crossed halfway, at 2.5.
    assert analysis.goodput([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.5]) == pytest.approx(2.5)
    assert analysis.goodput([3, 1, 2, 4], [0.85, 1.0, 0.95, 0.5]) == pytest.approx(2.5)  # any order
    assert analysis.goodput([1, 2], [0.99, 0.95]) == 2        # never drops: the top rate, a bound
    assert analysis.goodput([1, 2], [0.8, 0.5]) == 0.0        # misses from the start
    assert analysis.goodput([1, 2, 3], [1.0, 0.9, 0.2]) == pytest.approx(2.0)   # exactly 90% counts


def test_min_slo_scale_is_exact():
    # request i needs scale max(ftl/0.25, tpot/0.1) = (i + 1) / 10 (its TTFT binds)
    results = [result(0.025 * (i + 1), 0.001) for i in range(10)]
    assert analysis.min_slo_scale(results, 0.25, 0.1) == pytest.approx(0.9)
    # the TPOT side binds when it is the larger ratio
    assert analysis.min_slo_scale([result(0.0, 0.3)], 0.25, 0.1) == pytest.approx(3.0)
    # one failure among ten: all nine successes are needed
    assert analysis.min_slo_scale(results[:9], 0.25, 0.1, num_failed=1) == pytest.approx(0.9)
    assert analysis.min_slo_scale(results[:8], 0.25, 0.1, num_failed=2) == math.inf


def test_load_slo_paper_and_artifact_values():
    assert analysis.load_slo("sharegpt", "opt-13b") == (0.25, 0.1)
    assert analysis.load_slo("sharegpt", "opt-66b") == (2.5, 0.15)
    assert analysis.load_slo("sharegpt", "opt-66b", source="artifact") == (0.4, 0.1)
    assert analysis.load_slo("humaneval", "opt-66b", source="artifact") == (0.125, 0.2)
    with pytest.raises(KeyError, match="--ttft-slo"):
        analysis.load_slo("sharegpt", "opt-1b")


def test_num_gpus_defaults_and_overrides():
    gpus = analysis.parse_num_gpus(["vllm=2"], ["distserve", "vllm", "openai", "mine"], "opt-13b")
    assert gpus == {"distserve": 3, "vllm": 2, "openai": 2, "mine": 1}
    with pytest.raises(ValueError, match="backend=N"):
        analysis.parse_num_gpus(["distserve:3"], ["distserve"], "opt-13b")


def test_load_runs_parses_names_and_counts_failures(tmp_path):
    save_exp([result(0.1, 0.01)], tmp_path / "distserve-2-1.5.exp")
    save_failures([FailedRequest(1, 2, 0.0, "HTTP 500")], tmp_path / "distserve-2-1.5.exp")
    save_exp([result(0.1, 0.01)], tmp_path / "distserve-c21d11-4-10.exp")
    (tmp_path / "notes.exp").write_text("[]")
    runs = analysis.load_runs(tmp_path)
    assert sorted(runs) == ["distserve", "distserve-c21d11"]
    run = runs["distserve"][0]
    assert (run.num_prompts, run.rate, len(run.results), len(run.failures)) == (2, 1.5, 1, 1)
    assert analysis.run_attainment(run, 0.25, 0.1) == (0.5, 0.5, 0.5)


def test_analyse_fixture_runs_writes_table_and_figures(tmp_path, capsys):
    # Fixture request i at rate r has TTFT 0.03*i*r*k and TPOT 0.012*i*r*k (k = 0.5 distserve,
    # 1.5 vllm), so with SLOs 0.25/0.1 it attains iff i*r*k <= 8.33. distserve at 1.5/3/6 req/s on
    # 3 GPUs: 100%/60%/30% at 0.5/1/2 req/s/GPU -> goodput 0.5 + 0.1/0.4*0.5 = 0.625.
    # vllm at 0.5/1/2 on 1 GPU: the same shares at the same per-GPU rates -> 0.625, ratio 1.
    results_dir = tmp_path / "runs"
    shutil.copytree(FIXTURES / "exp", results_dir)
    out = analysis.analyse(results_dir, "opt-13b", "sharegpt", tmp_path / "plots")
    numbers = out["numbers"]
    assert numbers["distserve"]["goodput"] == pytest.approx(0.625)
    assert numbers["vllm"]["goodput"] == pytest.approx(0.625)
    assert numbers["ratio"]["goodput"] == pytest.approx(1.0)
    # SLO-scale view at 2 req/s/GPU for both (lowest top rate): i*6*0.5 = 3i <= 8.33*s for 9 of
    # 10 requests -> s = 3*8/8.33 = 2.88 (TTFT and TPOT ratios coincide here)
    assert numbers["distserve"]["slo_scale"] == pytest.approx(0.03 * 8 * 6 * 0.5 / 0.25)
    for path in [out["table"], *out["figures"]]:
        assert path.exists() and path.stat().st_size > 0
    assert {p.suffix for p in out["figures"]} == {".png", ".pdf"}
    assert "| distserve | 3 | 0.625 |" in out["table"].read_text()
    assert "distserve/vllm: 1.00x goodput" in capsys.readouterr().out
    # on one GPU distserve's per-GPU rates are 1.5/3/6: goodput 1.5 + 0.25*1.5 = 1.875, 3x vllm's
    one_gpu = analysis.analyse(results_dir, "opt-13b", "sharegpt", tmp_path / "plots1",
                               num_gpus=["distserve=1"])["numbers"]
    assert one_gpu["distserve"]["goodput"] == pytest.approx(1.875)
    assert one_gpu["ratio"]["goodput"] == pytest.approx(3.0)


def test_cli_with_explicit_slos_and_gpus(tmp_path):
    out_dir = tmp_path / "plots"
    rc = analysis.main([str(FIXTURES / "exp"), "--model", "opt-13b", "--workload", "sharegpt",
                        "--ttft-slo", "1.0", "--tpot-slo", "1.0", "--num-gpus", "distserve=1",
                        "--out", str(out_dir)])
    assert rc == 0
    table = (out_dir / "opt-13b-sharegpt-goodput.md").read_text()
    assert "TTFT SLO 1 s" in table and "| distserve | 1 |" in table
    assert (out_dir / "opt-13b-sharegpt.png").stat().st_size > 0
    assert (out_dir / "opt-13b-sharegpt.pdf").stat().st_size > 0
