"""Discrete-event simulator of DistServe-style serving, fed by a profiled latency model."""
from dsjax.simulator.cluster import (MODES, NVLINK_BYTES_PER_S, CROSS_NODE_BYTES_PER_S, Cluster,
                                     StopSimulation,
                                     SimConfig, poisson_arrivals, simulate)
from dsjax.simulator.instances import InstanceSpec
from dsjax.simulator.request import SimRequest, attainment_of

__all__ = ["MODES", "NVLINK_BYTES_PER_S", "CROSS_NODE_BYTES_PER_S", "Cluster", "SimConfig", "StopSimulation",
           "InstanceSpec", "SimRequest", "attainment_of", "poisson_arrivals", "simulate"]
