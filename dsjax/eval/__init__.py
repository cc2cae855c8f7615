"""The evaluation and planning kit: workloads, arrivals, results, replay, the latency model and
its profiler, the simulator and the placement search. Nothing in the serving path imports it."""
