"""engine_sim.fleet: N engine models on a virtual clock, fed precomputed block ids."""

from __future__ import annotations

import pytest

from engine_sim.cache import EngineHasher, KVCache
from engine_sim.fleet import SimFleet, full_blocks
from engine_sim.model import EngineModel, RequestTooLarge, SimRequest
from engine_sim.params import EngineParams

BS = 16
P = EngineParams(prefill_tokens_per_s=1000.0, decode_s_per_token=0.01, max_running=4,
                 capacity_blocks=40, block_size=BS)


def ids_req(rid: str, ids: list[int], prompt: int, out: int = 5) -> SimRequest:
    return SimRequest.from_blocks(rid, ids, prompt, out)


def test_block_ids_behave_exactly_like_token_ids() -> None:
    """The same sharing structure through SHA-256 of tokens or through given ids: same model."""
    h = EngineHasher(1)
    prompts = [list(range(0, 100)), list(range(0, 64)) + list(range(500, 540)),
               list(range(0, 100)), list(range(900, 1000))]
    by_tokens = EngineModel(KVCache(P.capacity_blocks, BS), P)
    by_ids = EngineModel(KVCache(P.capacity_blocks, BS, record_events=False), P)
    digest_id: dict[bytes, int] = {}
    a, b = [], []
    for k, p in enumerate(prompts):
        hashes = h.hash_blocks(p, BS)
        ids = [digest_id.setdefault(d, len(digest_id)) for d in hashes]
        ra = SimRequest(f"r{k}", p, hashes, 7)
        rb = ids_req(f"r{k}", ids, len(p), 7)
        by_tokens.submit(ra, 0.3 * k)
        by_ids.submit(rb, 0.3 * k)
        a.append(ra)
        b.append(rb)
    by_tokens.advance(100.0)
    by_ids.advance(100.0)
    for ra, rb in zip(a, b, strict=True):
        assert (ra.cached_tokens, ra.admitted_at, ra.first_token_at, ra.finished_at) == \
            (rb.cached_tokens, rb.admitted_at, rb.first_token_at, rb.finished_at)
    assert a[2].cached_tokens == 96 and a[1].cached_tokens == 64
    assert by_ids.cache.drain_events() == []  # events off: nothing built


def test_ids_must_be_full_blocks_and_full_blocks_drops_the_partial_tail() -> None:
    assert list(full_blocks([1, 2, 3], 40, BS)) == [1, 2]
    assert list(full_blocks([1, 2], 40, BS)) == [1, 2]
    c = KVCache(10, BS)
    with pytest.raises(ValueError, match="full blocks"):
        c.allocate_ids([1, 2, 3], 40, 1)
    with pytest.raises(ValueError):
        SimRequest.from_blocks("x", [], 0, 1)


def test_fleet_runs_nodes_independently_and_reports_engine_truth() -> None:
    f = SimFleet(2, P)
    r1 = ids_req("a", [1, 2, 3, 4], 70)
    f.submit(0, r1, 0.0)
    assert r1.ttft == pytest.approx(0.07)  # 70 uncached tokens at 1000/s
    r2 = ids_req("b", [1, 2, 3, 4], 70)
    f.submit(1, r2, 0.0)  # other node: nothing cached there
    assert r2.cached_tokens == 0
    assert f.next_event_time() == pytest.approx(0.07 + 4 * 0.01)
    done = f.advance(1.0)
    assert done in ([r1, r2], [r2, r1])
    r3 = ids_req("c", [1, 2, 3, 9], 70)
    f.submit(0, r3, 2.0)
    assert r3.cached_tokens == 48 and r3.ttft == pytest.approx(0.022)
    assert f.drain() == [r3]
    assert f.next_event_time() is None
    assert f.busy_s == pytest.approx([0.07 + 0.022, 0.07])
    with pytest.raises(ValueError, match="backwards"):
        f.advance(1.0)


def test_finished_requests_come_back_in_finish_order() -> None:
    f = SimFleet(3, P)
    reqs = [ids_req(f"r{i}", [100 * i + 1], 20, out=1 + 10 * (3 - i)) for i in range(3)]
    for i, r in enumerate(reqs):
        f.submit(i, r, 0.0)
    done = f.drain()
    assert [r.request_id for r in done] == ["r2", "r1", "r0"]
    assert [r.finished_at for r in done] == sorted(r.finished_at or 0 for r in done)


def test_pinning_and_admission_as_the_served_engine() -> None:
    f = SimFleet(1, P)
    big = ids_req("big", list(range(1, 31)), 30 * BS, out=BS * 5)  # 35 of 40 slots
    f.submit(0, big, 0.0)
    small = ids_req("small", [500, 501, 502, 503, 504, 505], 6 * BS, out=1)  # 7 slots
    f.submit(0, small, 0.0)
    obs = f.observe(0.0)[0]
    assert obs.queue_depth == 1 and obs.running == 1 and obs.used_blocks == 35
    assert f.nodes[0].reported(0.0) == (1, 1, 35, 40, 0.0) and f.nodes[0].nid == "node-0"
    assert small.admitted_at is None
    f.drain()
    assert small.admitted_at == pytest.approx(big.finished_at)
    with pytest.raises(RequestTooLarge):
        f.submit(0, ids_req("huge", [], 41 * BS), 100.0)


def test_registry_view_lags_by_the_heartbeat_delay() -> None:
    f = SimFleet(1, P, heartbeat_delay_s=1.0, registry_deltas=True)
    f.submit(0, ids_req("a", [7, 8, 9], 60), 0.0)  # ends at 0.06 + 0.04
    assert f.observe(0.0)[0].running == 1
    f.advance(0.5)
    assert f.observe(0.5)[0].running == 1  # load figures refresh once per interval (= delay)
    assert f.believed_match(0, [7, 8, 9], 0.5) == 0  # stored at 0.0, visible at 1.0
    assert f.registry_deltas(0.5) == []
    assert f.believed_match(0, [7, 8, 9], 1.0) == 3
    (d,) = f.registry_deltas(1.0)
    assert d.node_idx == 0 and d.stored == [7, 8, 9] and not d.removed
    assert f.observe(1.0)[0].running == 0


def test_live_view_and_evictions_show_in_deltas_and_rate() -> None:
    p = EngineParams(prefill_tokens_per_s=1e6, decode_s_per_token=0.0, max_running=4,
                     capacity_blocks=4, block_size=BS)
    f = SimFleet(1, p, registry_deltas=True)
    f.submit(0, ids_req("a", [1, 2], 3 * BS, out=1), 0.0)  # 2 ids + 2 anon slots
    f.advance(1.0)
    assert f.believed_match(0, [1, 2, 3], 1.0) == 2
    f.submit(0, ids_req("b", [5, 6], 3 * BS, out=1), 1.0)  # evicts 2 then 1 (tail first)
    deltas = f.registry_deltas(1.0)
    assert deltas[0].stored == [1, 2, 5, 6] and deltas[0].removed == [2, 1]
    obs = f.observe(1.0)[0]
    assert obs.evictions_total == 2 and obs.eviction_rate == pytest.approx(0.2)
    assert f.observe(11.0)[0].eviction_rate == pytest.approx(0.2 / 2.718281828, rel=1e-3)


def test_engine_settings_of_a_multi_engine_process() -> None:
    from engine_sim.settings import EngineSimSettings

    s = EngineSimSettings(engines=3, listen="127.0.0.1:8000", metrics_listen="127.0.0.1:0",
                          events_endpoint="tcp://127.0.0.1:5557", replay_endpoint="ipc:///tmp/r",
                          ready_file="/tmp/x.json")
    e2 = s.for_engine(2)
    assert (e2.listen, e2.metrics_listen, e2.events_endpoint, e2.replay_endpoint) == \
        ("127.0.0.1:8002", "127.0.0.1:0", "tcp://127.0.0.1:5559", "ipc:///tmp/r.2")
    assert e2.engines == 1 and e2.ready_file == ""
    assert EngineSimSettings().for_engine(0) == EngineSimSettings()
    assert EngineSimSettings().engine_params() == EngineParams(capacity_blocks=4096,
                                                               block_size=16)


def test_a_fleet_has_a_role_per_node() -> None:
    from engine_sim.params import transfer_s_per_block

    fleet = SimFleet(3, EngineParams(capacity_blocks=64, block_size=16),
                     roles=["prefill", "decode", "decode"])
    assert fleet.roles == ["prefill", "decode", "decode"]
    assert [n.model.params.role for n in fleet.nodes] == fleet.roles
    with pytest.raises(ValueError, match="roles"):
        SimFleet(2, EngineParams(), roles=["prefill"])
    assert transfer_s_per_block("seed", 512) == pytest.approx(0.002)
    assert transfer_s_per_block("seed", 16) == pytest.approx(0.002 / 32)
    assert transfer_s_per_block("0.5", 16) == 0.5
    with pytest.raises(ValueError):
        transfer_s_per_block("fast", 16)
