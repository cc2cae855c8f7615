"""Discrete-event simulator of DistServe-style serving, fed by a profiled latency model."""
from dsjax.eval.simulator.cluster import (SIM_MODES, NVLINK_BYTES_PER_S, CROSS_NODE_BYTES_PER_S, Cluster,
                                     StopSimulation,
                                     SimConfig, poisson_arrivals, simulate)
from dsjax.eval.simulator.rebalance import RebalancePolicy
from dsjax.eval.simulator.sim_instances import Parallelism
from dsjax.eval.simulator.sim_request import SimRequest, attainment_of

__all__ = ["SIM_MODES", "NVLINK_BYTES_PER_S", "CROSS_NODE_BYTES_PER_S", "Cluster", "SimConfig", "StopSimulation",
           "Parallelism", "RebalancePolicy", "SimRequest", "attainment_of", "poisson_arrivals", "simulate"]
