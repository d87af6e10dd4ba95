"""``bench.stack_pd._fill``: the disaggregated stack row from engine records (no stack needed)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.results import PolicyRun
from bench.sim.pd_replay import PdRun
from bench.stack_pd import _fill, _Pair
from bench.workloads.base import TraceRequest, Workload

START = 100.0
"""The dispatch's schedule origin (``perf_counter``): request i is sent at START + arrival x
TIME_SCALE."""
TIME_SCALE = 0.05


def _recs(rid: str, arrival: float, e2e: float) -> list[dict[str, Any]]:
    """The prefill (``#p``) and decode (``#d``) records of one pair, on engine clocks."""
    return [{"request_id": f"{rid}#p", "prompt_tokens": 32, "cached_tokens": 0,
             "arrival": arrival, "first_token_at": arrival + e2e, "finished_at": arrival + e2e},
            {"request_id": f"{rid}#d", "cached_tokens": 0, "arrival": 50.0,
             "admitted_at": 50.0, "first_token_at": 50.1, "finished_at": 50.2}]


def test_return_lag_is_release_minus_engine_answer_from_the_dispatch_start() -> None:
    reqs = [TraceRequest("a", 0.0, (1, 2), 32, 2), TraceRequest("b", 1.0, (3, 4), 32, 2),
            TraceRequest("c", 0.5, (5, 6), 32, 2)]
    workload = Workload("w", 16, reqs)
    nodes = ["prefill-0", "prefill-1", "decode-0"]
    # engine clocks: prefill-0 sees a 10.0 late, b 10.2 late (arrival lag 0.2); prefill-1 sees
    # c 2.5 late (its earliest: lag 0); prefill e2e 0.5 / 0.3 / 0.4 model s
    stats = {"prefill-0": {"records": _recs("a", 10.0, 0.5) + _recs("b", 11.2, 0.3)},
             "prefill-1": {"records": _recs("c", 3.0, 0.4)}}
    answered = [0.0 + 0.0 + 0.5, 1.0 + 0.2 + 0.3, 0.5 + 0.0 + 0.4]  # arrival + lag + e2e
    want = [0.1, 0.25, 0.05]
    outs = [_Pair(prefill=n, decode="decode-0", handoff_s=0.0,
                  released_at=START + (t + lag) * TIME_SCALE)
            for n, t, lag in zip(["prefill-0", "prefill-0", "prefill-1"], answered, want,
                                 strict=True)]
    outs.append(_Pair())  # a request whose release was never acknowledged
    reqs.append(TraceRequest("d", 2.0, (7, 8), 32, 2))
    stats["prefill-1"]["records"] += _recs("d", 5.0, 0.1)
    outs[3].prefill, outs[3].decode = "prefill-1", "decode-0"
    run = PolicyRun("stack-pd:test", nodes, len(reqs))
    run.init_requests(len(reqs))
    n = len(reqs)
    pd = PdRun(run, 2, [-1] * n, [0] * n, [math.nan] * n, [math.nan] * n, [math.nan] * n,
               [0] * n, [0] * n)
    _fill(pd, workload, outs, stats, nodes, TIME_SCALE, 1000.0, START)
    assert run.arrival_lag_by_request[:3] == pytest.approx([0.0, 0.2, 0.0])
    assert run.return_lag_by_request[:3] == pytest.approx(want)
    assert math.isnan(run.return_lag_by_request[3])
    assert run.return_lag_s == pytest.approx(want)
    # an origin 10 ms wall earlier (the old t_wall before the setup) adds 0.2 model s to each
    _fill(pd, workload, outs, stats, nodes, TIME_SCALE, 1000.0, START - 0.01)
    assert run.return_lag_s == pytest.approx([w + 0.2 for w in want])
