"""Serving units and mixed fleets, worked out by hand."""
import pytest

from dsjax.config import EngineConfig
from dsjax.eval.fleet import Part, best_fleet, packs
from dsjax.eval.simulator import Parallelism, SimConfig
from dsjax.eval.units import Unit

DISAGG = Unit("disaggregated", Parallelism(2, 1), Parallelism(1, 1), 1, 1)      # 3 GPUs
TP1 = Unit("colocated", Parallelism(1, 1))
TP4 = Unit("chunked", Parallelism(4, 1), chunk=1024)


def test_units_count_gpus_and_node_bound_groups():
    assert (DISAGG.num_gpus, DISAGG.blocks()) == (3, [2, 1])
    assert Unit("colocated", Parallelism(2, 4)).blocks() == [2, 2, 2, 2]
    assert DISAGG.describe(2) == "prefill tp=2 pp=1 x 2, decode tp=1 pp=1 x 2"
    assert TP4.describe(3) == "tp=4 pp=1 budget=1024 x 3"
    with pytest.raises(ValueError, match="token budget"):
        Unit("chunked", Parallelism(1, 1))


@pytest.mark.parametrize("unit", [DISAGG, TP1, TP4])
def test_unit_settings_are_engine_config_fields(unit):
    config = EngineConfig.from_dict(unit.engine_settings("opt-13b", 2, SimConfig()))
    assert config.mode == unit.mode
    assert config.context_tensor_parallel_size == unit.prefill.tp
    if unit.mode == "chunked":
        assert config.decoding_max_tokens_per_batch == 1024
    if unit.mode == "disaggregated":
        assert (config.num_prefill_instances, config.num_decode_instances) == (2, 2)


def test_first_fit_decreasing_packs_groups_into_nodes():
    assert packs([4, 2, 1, 1], 1, 8)
    assert packs([4, 4, 2, 2, 2, 2], 2, 8)
    assert not packs([4, 4, 2], 2, 4)          # 10 GPUs' worth on 8
    assert not packs([3, 3, 3], 2, 4)          # 9 > 8, and a 3 never shares a node of 4 with a 3


def test_fleet_fills_what_the_best_unit_leaves_idle():
    # On 4 GPUs: the 3-GPU unit (6 req/s) plus a 1-GPU one (1.5) serve 7.5, more than the
    # 4-GPU unit alone (7.0), although that one is better per GPU than the pair (1.75 < 1.875).
    units = [Part(DISAGG, 1, 6.0), Part(TP1, 1, 1.5), Part(TP4, 1, 7.0)]
    fleet = best_fleet(units, 1, 4)
    assert {(p.unit, p.copies) for p in fleet} == {(DISAGG, 1), (TP1, 1)}


def test_fleet_for_a_rate_uses_the_fewest_gpus():
    units = [Part(DISAGG, 1, 6.0), Part(TP1, 1, 1.5), Part(TP4, 1, 7.0)]
    # 9 req/s: 3 + 1 + 1 GPUs (6 + 1.5 + 1.5); every 4-GPU fleet serves at most 7.5.
    fleet = best_fleet(units, 1, 8, rate=9.0)
    assert {(p.unit, p.copies) for p in fleet} == {(DISAGG, 1), (TP1, 2)}
    assert best_fleet(units, 1, 4, rate=100.0) == []
