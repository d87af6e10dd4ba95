"""What the router replicas of a ``--mode stack --routers N`` replay could see (issue 19).

Two things decide whether replicas deciding the same burst are blind to one another: how old
another replica's decision is when it reaches this one (the shared view's staleness, each
router's ``kvroute_router_shared_view_staleness_seconds`` histogram) and how far apart the
burst's decisions are (the client's own clock: when it sent each Route and had its answer,
wall time). A peer's decision made less than the staleness before this replica's is one it
decided without; own decisions farther apart than ``--share-burst-window-s`` do not count as a
burst by the window rule. Both are reported per replica (row notes and JSON ``replica_view``).

A *tick* is the set of requests the workload schedules at one instant (the Mooncake trace's
quantised 3-s timestamps; with ``--arrival-spread-s`` every request is its own tick and there is
no burst to describe). Route API replays only: a gateway decides in-process, so the client never
sees its decision apart from the whole answer.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

STALENESS_METRIC = "kvroute_router_shared_view_staleness_seconds"
_LE = re.compile(r'[{,]le="([^"]*)"')


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """A Prometheus histogram's cumulative buckets ``[(le, count), ...]`` (sorted, ``+Inf``
    last), its sum and its count from a text exposition page (all label sets summed per
    bound); empty buckets when the page does not export it."""
    buckets: dict[float, float] = defaultdict(float)
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            labels, _, value = line.rpartition(" ")
            found = _LE.search(labels)
            if found is None:
                continue
            le = found.group(1)
            buckets[math.inf if le == "+Inf" else float(le)] += float(value)
        elif line.startswith((name + "_sum ", name + "_sum{")):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith((name + "_count ", name + "_count{")):
            count += float(line.rsplit(" ", 1)[1])
    return sorted(buckets.items()), total, count


def histogram_summary(text: str, name: str = STALENESS_METRIC) -> dict[str, Any]:
    """Count, mean (exact: sum / count), p50 and p99 (interpolated within their bucket, as
    PromQL's ``histogram_quantile``; ``p50_bucket_ms`` / ``p99_bucket_ms``: that bucket's
    ``[lower, upper]`` bounds, upper None past the last finite bound — the quantile is only
    known to lie in it) and an upper bound on the max (``max_le_ms``: the bound of the bucket
    holding the largest observation; past the last finite bound ``max_le_ms`` is None and
    ``max_above_ms`` that bound), in milliseconds."""
    buckets, total, count = histogram(text, name)
    if not buckets or count <= 0:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None,
                "p50_bucket_ms": None, "p99_bucket_ms": None,
                "max_le_ms": None, "max_above_ms": None}

    def quantile(q: float) -> tuple[float, float, float]:
        """(interpolated value, bucket lower bound, bucket upper bound) in seconds."""
        rank, lo, below = q * count, 0.0, 0.0
        for le, cum in buckets:
            if cum >= rank:
                if math.isinf(le):
                    return lo, lo, le  # PromQL: the highest finite bound
                frac = (rank - below) / (cum - below) if cum > below else 1.0
                return lo + (le - lo) * frac, lo, le
            lo, below = le, cum
        return lo, lo, math.inf

    def ms(v: float) -> float | None:
        return None if math.isinf(v) else round(v * 1000, 3)

    q50, q99 = quantile(0.5), quantile(0.99)

    top = next(le for le, cum in buckets if cum >= count)
    finite = [le for le, _ in buckets if not math.isinf(le)]
    return {"count": int(count), "mean_ms": round(total / count * 1000, 3),
            "p50_ms": ms(q50[0]), "p99_ms": ms(q99[0]),
            "p50_bucket_ms": [ms(q50[1]), ms(q50[2])], "p99_bucket_ms": [ms(q99[1]), ms(q99[2])],
            "max_le_ms": None if math.isinf(top) else round(top * 1000, 3),
            "max_above_ms": round(finite[-1] * 1000, 3) if math.isinf(top) and finite else None}


def _pcts(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90 = np.percentile(np.asarray(values, dtype=float), [50, 90])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2),
            "max": round(float(max(values)), 2)}


def burst_spacing(ticks: Sequence[float], fronts: Sequence[int], sent_s: Sequence[float],
                  answered_s: Sequence[float], replicas: int, window_ms: float,
                  staleness: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Intra-tick spacing of the replicas' decisions (wall milliseconds, client clock).

    Per request: its tick (scheduled arrival), the replica it was sent to, and the wall seconds
    after the replay's start the client sent its Route and had the answer (NaN: failed).
    Decisions are timed by the answer (the replica decided before it; the router exports no
    per-decision time). The answer trails the decision by part of the Route's round trip, and
    that round trip's jitter can be as large as the gaps compared, so the shares come with
    bounds: the decision lies somewhere between the send and the answer.
    ``staleness``: per replica, :func:`histogram_summary` of its view.

    Overall: ticks with 2+ requests, their send and answer spread (first to last). Per replica:
    its decisions in such ticks; the gap between its consecutive decisions of one tick
    (``own_gap_ms``, and the share within ``window_ms``: a burst by the window rule); the time
    since the latest earlier decision of another replica in the same tick (``peer_gap_ms``);
    of all earlier same-tick peer decisions, the share made less than its staleness p50 / p99
    before (``peers_unseen_p50`` / ``_p99``: decided without them, likely / at worst, timed by
    the answers) with their bounds from the send / answer times (``..._bounds``: ``[surely,
    possibly]``: the share for which even the widest possible gap, own answer minus the
    peer's send, is below the staleness / for which the narrowest, own send minus the peer's
    answer, is); and its Route round trip (``route_rtt_ms``: the timing's error).
    """
    by_tick: dict[float, list[int]] = defaultdict(list)
    for i, t in enumerate(ticks):
        if fronts[i] >= 0 and not math.isnan(answered_s[i]):
            by_tick[t].append(i)
    bursts = [sorted(ix, key=lambda i: answered_s[i]) for ix in by_tick.values() if len(ix) > 1]
    out: dict[str, Any] = {
        "burst_ticks": len(bursts),
        "tick_send_spread_ms": _pcts([(max(sent_s[i] for i in b) - min(sent_s[i] for i in b))
                                      * 1000 for b in bursts]),
        "tick_answer_spread_ms": _pcts([(answered_s[b[-1]] - answered_s[b[0]]) * 1000
                                        for b in bursts]),
        "window_ms": round(window_ms, 3),
        "per_replica": [],
    }
    for k in range(replicas):
        st = staleness[k] if k < len(staleness) else {}
        s50, s99 = st.get("p50_ms"), st.get("p99_ms")
        own_gaps: list[float] = []
        peer_gaps: list[float] = []
        earlier = unseen50 = unseen99 = decisions = 0
        surely50 = surely99 = maybe50 = maybe99 = 0
        for b in bursts:
            last_own = math.nan
            for pos, i in enumerate(b):
                if fronts[i] != k:
                    continue
                decisions += 1
                t = answered_s[i] * 1000
                if not math.isnan(last_own):
                    own_gaps.append(t - last_own)
                last_own = t
                peers = [answered_s[j] * 1000 for j in b[:pos] if fronts[j] != k]
                if peers:
                    peer_gaps.append(t - peers[-1])
                earlier += len(peers)
                if s50 is not None and s99 is not None:
                    unseen50 += sum(1 for p in peers if t - p < s50)
                    unseen99 += sum(1 for p in peers if t - p < s99)
                    widest = [t - sent_s[j] * 1000 for j in b[:pos] if fronts[j] != k]
                    narrowest = [sent_s[i] * 1000 - p for p in peers]
                    surely50 += sum(1 for g in widest if g < s50)
                    surely99 += sum(1 for g in widest if g < s99)
                    maybe50 += sum(1 for g in narrowest if g < s50)
                    maybe99 += sum(1 for g in narrowest if g < s99)
        rtts = [(answered_s[i] - sent_s[i]) * 1000 for i in range(len(ticks))
                if fronts[i] == k and not math.isnan(answered_s[i])]
        out["per_replica"].append({
            "replica": k, "staleness_ms": st, "decisions_in_ticks": decisions,
            "own_gap_ms": _pcts(own_gaps),
            "own_gaps_within_window": (round(sum(g <= window_ms for g in own_gaps)
                                             / len(own_gaps), 3) if own_gaps else None),
            "peer_gap_ms": _pcts(peer_gaps),
            "earlier_peer_decisions": earlier,
            "peers_unseen_p50": round(unseen50 / earlier, 3) if earlier and s50 else None,
            "peers_unseen_p99": round(unseen99 / earlier, 3) if earlier and s99 else None,
            "peers_unseen_p50_bounds": ([round(surely50 / earlier, 3),
                                         round(maybe50 / earlier, 3)] if earlier and s50 else None),
            "peers_unseen_p99_bounds": ([round(surely99 / earlier, 3),
                                         round(maybe99 / earlier, 3)] if earlier and s99 else None),
            "route_rtt_ms": _pcts(rtts),
        })
    return out


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def _max(st: dict[str, Any]) -> str:
    if st.get("max_above_ms") is not None:
        return f"> {st['max_above_ms']:g}"
    return f"<= {_ms(st.get('max_le_ms'))}"


def _bounds(b: list[Any] | None) -> str:
    return "-" if b is None else f"[{_ms(b[0])}, {_ms(b[1])}]"


def _bucket(b: list[Any] | None) -> str:
    if b is None:
        return "-"
    return f"in ({_ms(b[0])}, {'+Inf' if b[1] is None else _ms(b[1])}]"


def spacing_note(view: dict[str, Any]) -> str:
    """The row note for :func:`burst_spacing` (one line per replica, wall ms)."""
    if not view["burst_ticks"]:
        return "burst spacing: no tick holds 2+ requests (arrivals spread): nothing to describe"
    send, ans = view["tick_send_spread_ms"], view["tick_answer_spread_ms"]
    parts = [f"burst spacing (wall ms, client clock; {view['burst_ticks']} ticks of 2+ "
             f"requests): a tick's Routes sent over p50 {send['p50']:g} / p90 {send['p90']:g}, "
             f"answered over p50 {ans['p50']:g} / p90 {ans['p90']:g}; window "
             f"{view['window_ms']:g}"]
    for r in view["per_replica"]:
        st, own, peer, rtt = (r["staleness_ms"], r["own_gap_ms"] or {}, r["peer_gap_ms"] or {},
                              r["route_rtt_ms"] or {})
        parts.append(
            f"#{r['replica']}: staleness p50 {_ms(st.get('p50_ms'))} "
            f"({_bucket(st.get('p50_bucket_ms'))}) / p99 {_ms(st.get('p99_ms'))} "
            f"({_bucket(st.get('p99_bucket_ms'))}) / max {_max(st)} (mean "
            f"{_ms(st.get('mean_ms'))}, n {st.get('count', 0)}); "
            f"{r['decisions_in_ticks']} decisions in ticks, own gap p50 {_ms(own.get('p50'))}"
            f" / p90 {_ms(own.get('p90'))}"
            f" ({_ms(r['own_gaps_within_window'])} within the window), since the last peer's "
            f"p50 {_ms(peer.get('p50'))} / p90 {_ms(peer.get('p90'))}; earlier peer decisions of"
            f" its ticks {r['earlier_peer_decisions']}, made within its staleness p50 / p99: "
            f"{_ms(r['peers_unseen_p50'])} / {_ms(r['peers_unseen_p99'])} (bounds from send"
            f" / answer times {_bounds(r['peers_unseen_p50_bounds'])} / "
            f"{_bounds(r['peers_unseen_p99_bounds'])}); Route RTT (the timing's error) p50 "
            f"{_ms(rtt.get('p50'))} / p90 {_ms(rtt.get('p90'))}")
    return "; ".join(parts)
