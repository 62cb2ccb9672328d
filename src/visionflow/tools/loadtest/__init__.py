"""Loopback load test for `visionflow serve`: throughput, latency percentiles and errors by status.

Phases (each one bounded by a duration AND a request count, so a run can never go on unbounded):

- single: sequential requests, one at a time: the latency of a request that waits for nothing.
- ramp: closed loop at concurrency 1, 2, 4, ... up to the server's slots (max_concurrency + queue_depth); the
  best error-free throughput is the maximum.
- sustained: constant arrival rate (open loop) at a fraction (0.7) of that maximum: requests start on a fixed
  schedule whether or not earlier ones have finished, so a slow server cannot slow the client down and hide its
  own queueing (no coordinated omission).
- overload: closed loop well past the server's slots (3x max_concurrency + queue_depth): the server must shed
  the excess with fast 503s and stay healthy.

Healthy after: /health and /ready answer 200 and three predictions succeed.

The server and the generator run on disjoint CPU sets (on Linux; default: the generator on the last usable CPU,
the server on the others; 1 + 1 on 2 cores), so that the generator does not take the cores it measures: a server
found by its listening port or started by the load test has every process and thread pinned, re-checked before
each phase (inference workers started or replaced meanwhile), and each phase reports the cores each side used.

Only loopback targets are accepted: this is a tool to measure your own server, not to load somebody else's.
Every request is a real prediction: the server appends it to its prediction log and queues low-confidence ones
for review, so point serve.prediction_log / serve.review_dir somewhere disposable when the root matters.

Modules: client (loopback guard, keep-alive HTTP/1.1 client), phases (sequential, closed and open loop), server
(the server's /metrics view of a phase), run (settings, modes, the report), report (summary and tables), cpus
(CPU lists, the split, pinning a process thread by thread), placement (the two sets, the server's process tree,
CPU used), local (starting `visionflow serve` pinned, or finding the running one by its port).
"""

from visionflow.tools.loadtest.client import LoadTestError
from visionflow.tools.loadtest.report import render
from visionflow.tools.loadtest.run import run_loadtest

__all__ = ["LoadTestError", "render", "run_loadtest"]
