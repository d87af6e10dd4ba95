"""Disaggregated prefill/decode: node roles and the decode half of a (prefill, decode) pair.

A node serves one **role**: ``prefill`` (computes prompts' KV and hands it over), ``decode``
(receives the KV and generates) or ``both`` (an ordinary aggregated engine, usable in either
half). A model whose fleet has prefill-only *and* decode-only nodes is served disaggregated
(requests may also ask for it, or opt out); its aggregated ``both`` nodes stay usable as an
aggregated pool and as either half of a pair.

The routing core picks the prefill node with the request's policy (kv_aware: prefix overlap
and queued prefill) among prefill-capable nodes, then asks :class:`DecodeChooser` for the decode
node given that prefill node. ``kv_aware`` (the default decode policy) scores each
decode-capable node, in seconds (lower is better)::

    transfer_blocks(d) * pd_transfer_s_per_block          # KV it must receive (0 on the same node)
    + pd_decode_load_cost_s * (inflight(d) + queue(d))    # decode load
    + pd_headroom_penalty_s * short(d) / need             # KV it lacks room for (would queue)

where ``transfer_blocks(d) = ceil((prompt - matched(d) * block_size) / block_size)`` — the
blocks of the request the decode node does not already hold (a follow-up turn on the node that
decoded the conversation receives only the new part) — and ``short(d)`` the blocks it would
have to allocate beyond its free KV. Nodes over the load cap (in-flight + 1 > factor x mean +
slack, as kv_aware's) are not eligible. ``least_loaded`` and ``round_robin`` are the baselines
the bench compares against (decode chosen by load alone / in turn).

``matched(d)`` also counts the blocks committed pairs are still handing to ``d`` (their prefill
has not finished, so neither ``d`` nor the registry holds them yet: :class:`InTransit`). With a
kv_aware prefill policy the pair is searched jointly when prefill candidates can also decode
(``both`` nodes): a candidate's estimated TTFT + its decode score (0 transfer when it decodes
itself) competes with the prefill policy's node + its best decode node
(:meth:`DecodeChooser.choose_pair`). In a fleet of prefill-only and decode-only nodes the two
halves are independent (the transfer depends on the decode node alone), so the joint search
changes nothing there.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.settings import require, setting
from router_service.policies.base import (
    Candidate,
    Decision,
    NodeView,
    NoEligibleNode,
    RequestView,
)

ROLES = ("both", "prefill", "decode")
"""Node roles, as agents report them (``--role``)."""
PREFILL_CAPABLE = frozenset({"both", "prefill"})
DECODE_CAPABLE = frozenset({"both", "decode"})
DECODE_POLICIES = ("kv_aware", "least_loaded", "round_robin")
DECODE_KEY_SUFFIX = "/decode"
"""The load tracker holds a pair's decode half under ``request_id + DECODE_KEY_SUFFIX``."""


def check_role(role: str) -> str:
    """``role`` normalised ('' = both); ValueError for an unknown one."""
    r = (role or "both").strip().lower()
    if r not in ROLES:
        raise ValueError(f"role: must be one of {', '.join(ROLES)} (got {role!r})")
    return r


def wants_pd(roles: Sequence[str], asked: bool | None) -> bool:
    """Whether a request for a model whose nodes have ``roles`` goes disaggregated:
    ``asked`` when given, else when the model has both prefill-only and decode-only nodes."""
    if asked is not None:
        return asked
    return "prefill" in roles and "decode" in roles


@dataclass(frozen=True)
class DisaggSettings:
    """How the decode node of a disaggregated pair is chosen (flags ``--pd-*``)."""

    pd_decode_policy: str = setting(
        "kv_aware", "decode node choice: kv_aware (blocks it already holds, KV headroom, "
                    "decode load), least_loaded (load alone) or round_robin")
    pd_transfer_s_per_block: float = setting(
        0.002, "the router's estimate of seconds to move one KV block from the prefill to the "
               "decode node (set it from your interconnect; the seed's 2 ms is the default)")
    pd_decode_load_cost_s: float = setting(
        0.001, "seconds charged per request in flight or queued on a decode node")
    pd_headroom_penalty_s: float = setting(
        1.0, "seconds charged when none of the request's KV fits the decode node's free "
             "blocks (linear in the fraction that does not fit)")
    pd_load_cap_factor: float = setting(
        1.25, "a decode node is eligible only while its in-flight requests (with this one) "
              "stay <= this factor x the decode pool's mean + pd_load_cap_slack")
    pd_load_cap_slack: float = setting(5.0, "absolute headroom of the decode load cap, requests")
    pd_joint_pairs: bool = setting(
        True, "with kv_aware prefill, search the (prefill, decode) pair jointly when a prefill "
              "candidate can also decode (a 'both' node): estimated TTFT there + its decode "
              "score (no transfer) against the prefill policy's node + its best decode node")
    pd_count_in_transit: bool = setting(
        True, "count the blocks committed pairs are still handing to a decode node (prefill "
              "not finished) as held there, so a follow-up turn sent while the previous one "
              "is in prefill follows it (--no-pd-count-in-transit: the registry's view only)")

    def __post_init__(self) -> None:
        require(self.pd_decode_policy in DECODE_POLICIES, "pd_decode_policy",
                f"must be one of {', '.join(DECODE_POLICIES)}")
        for name in ("pd_transfer_s_per_block", "pd_decode_load_cost_s",
                     "pd_headroom_penalty_s", "pd_load_cap_slack"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(self.pd_load_cap_factor >= 1, "pd_load_cap_factor", "must be >= 1")


@dataclass(frozen=True, slots=True)
class DecodePick:
    """The decode half of a pair."""

    node_id: str
    matched_blocks: int
    """Prefix blocks of the request the decode node already holds (registry's belief)."""
    transfer_blocks: int
    """Blocks it must receive from the prefill node (0 when prefill and decode are one node)."""
    reason: str
    candidates: tuple[Candidate, ...]
    blocks: Sequence[int] = ()
    """The request's blocks (on their way to the node until the prefill half completes)."""
    score: float = 0.0
    """The decode policy's score of the node (kv_aware: seconds; lower is better)."""


def transfer_blocks(req: RequestView, matched: int, same_node: bool) -> int:
    """Blocks of the prompt a decode node holding ``matched`` prefix blocks must receive."""
    if same_node:
        return 0
    missing = max(0, req.prompt_tokens - matched * req.block_size)
    return -(-missing // req.block_size)


class InTransit:
    """Blocks that committed pairs are handing to their decode node: from the decision until
    the prefill half completes (then the node holds and reports them). Bounded: the oldest
    pairs are forgotten past ``max_pairs`` (a front end that never completes)."""

    def __init__(self, max_pairs: int = 100_000) -> None:
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[str, tuple[str, Sequence[int]]] = OrderedDict()
        self._blocks: dict[str, dict[int, int]] = {}  # node -> block -> pairs carrying it

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, request_id: str, node_id: str, blocks: Sequence[int]) -> None:
        """``blocks`` are on their way to ``node_id`` for ``request_id``."""
        self.release(request_id)
        self._pairs[request_id] = (node_id, blocks)
        held = self._blocks.setdefault(node_id, {})
        for h in blocks:
            held[h] = held.get(h, 0) + 1
        while len(self._pairs) > self.max_pairs:
            self.release(next(iter(self._pairs)))

    def release(self, request_id: str) -> None:
        """The pair's KV has landed (or the request ended)."""
        entry = self._pairs.pop(request_id, None)
        if entry is None:
            return
        node_id, blocks = entry
        held = self._blocks[node_id]
        for h in blocks:
            n = held[h] - 1
            if n:
                held[h] = n
            else:
                del held[h]

    def depth(self, node_id: str, blocks: Sequence[int]) -> int:
        """Leading ``blocks`` on their way to ``node_id``."""
        held = self._blocks.get(node_id)
        if not held:
            return 0
        n = 0
        for h in blocks:
            if h not in held:
                break
            n += 1
        return n


class DecodeChooser:
    """Chooses the decode node of a pair (module docstring); state changes on commit only."""

    def __init__(self, settings: DisaggSettings | None = None) -> None:
        self.settings = settings or DisaggSettings()
        self._turn = 0
        self.transferred_blocks = 0
        """Blocks the committed pairs are expected to move (a counter for stats)."""
        self.pairs = 0
        self.in_transit = InTransit()

    def choose(self, req: RequestView, prefill_node: str, nodes: Sequence[NodeView],
               policy: str | None = None) -> DecodePick:
        """Best decode node for ``req`` once ``prefill_node`` has prefilled it."""
        s = self.settings
        name = policy or s.pd_decode_policy
        healthy = [v for v in nodes if v.healthy]
        if not healthy:
            raise NoEligibleNode("no healthy decode node")
        total = sum(v.inflight for v in healthy)
        cap = max(s.pd_load_cap_factor * (total + 1) / len(healthy) + s.pd_load_cap_slack,
                  min(v.inflight for v in healthy) + 1)  # the least loaded stays eligible
        need = max(1, -(-(req.prompt_tokens + req.output_tokens) // req.block_size))
        scored: list[tuple[float, int, int, NodeView]] = []
        out: list[Candidate] = []
        transit = name == "kv_aware" and s.pd_count_in_transit and len(self.in_transit) > 0
        for i, seen in enumerate(nodes):
            v = seen
            if transit and v.node_id != prefill_node:
                coming = self.in_transit.depth(v.node_id, req.block_hashes)
                if coming > v.matched_blocks:  # handed there, not yet reported
                    v = dataclasses.replace(v, matched_blocks=coming)
            moved = transfer_blocks(req, v.matched_blocks, v.node_id == prefill_node)
            if not v.healthy:
                out.append(Candidate(v.node_id, math.inf, v.matched_blocks, v.load, "unhealthy"))
                continue
            if name == "kv_aware" and v.inflight + 1 > cap:
                out.append(Candidate(v.node_id, math.inf, v.matched_blocks, v.load,
                                     f"in-flight {v.inflight} over cap {cap:.1f}"))
                continue
            if name == "round_robin":
                score = float((i - self._turn) % len(nodes))
            elif name == "least_loaded":
                score = float(v.load)
            else:
                free = v.capacity_blocks - v.used_blocks if v.capacity_blocks else need
                short = max(0, need - v.matched_blocks - max(0, free))
                score = (moved * s.pd_transfer_s_per_block + s.pd_decode_load_cost_s * v.load
                         + s.pd_headroom_penalty_s * short / need)
            rot = (i - self._turn) % len(nodes)
            scored.append((score, rot, moved, v))
            out.append(Candidate(v.node_id, score, v.matched_blocks, v.load))
        if not scored:
            raise NoEligibleNode("every decode node is over the load cap")
        score, _, moved, best = min(scored, key=lambda t: (t[0], t[1]))
        out.sort(key=lambda c: c.score)
        held = min(best.matched_blocks * req.block_size, req.prompt_tokens)
        if best.node_id == prefill_node:
            why = "same node as the prefill: nothing to transfer"
        else:
            why = f"holds {best.matched_blocks} blocks ({held}/{req.prompt_tokens} tokens), " \
                  f"receives {moved}"
        reason = f"decode {name}: {why}, load {best.load}"
        if name == "kv_aware":
            reason += f" (cap {cap:.1f}), score {score * 1000:.1f} ms"
        return DecodePick(best.node_id, best.matched_blocks, moved, reason, tuple(out),
                          req.block_hashes, score)

    def choose_pair(self, req: RequestView, decision: Decision, nodes: Sequence[NodeView],
                    policy: str | None = None, joint: bool = False,
                    ) -> tuple[Decision, DecodePick]:
        """The decode node for the prefill policy's ``decision``; with ``joint`` (the prefill
        scores are estimated TTFT seconds, as kv_aware's) and kv_aware decode, every eligible
        prefill candidate that can also decode is tried as the prefill node too, and the pair
        with the lowest prefill estimate + decode score wins (a ``both`` node decoding what
        it prefilled moves nothing)."""
        pick = self.choose(req, decision.node_id, nodes, policy)
        name = policy or self.settings.pd_decode_policy
        if not (joint and self.settings.pd_joint_pairs and name == "kv_aware"):
            return decision, pick
        decoders = {v.node_id for v in nodes if v.healthy}
        base = next((c.score for c in decision.candidates
                     if c.node_id == decision.node_id and not c.excluded), math.inf)
        best_total = base + pick.score
        if not math.isfinite(best_total):
            return decision, pick
        alt: tuple[Candidate, DecodePick] | None = None
        for c in decision.candidates:
            if (c.excluded or c.node_id == decision.node_id or c.node_id not in decoders
                    or not c.score < best_total):  # a decode score is >= 0
                continue
            other = self.choose(req, c.node_id, nodes, policy)
            if c.score + other.score < best_total:
                best_total, alt = c.score + other.score, (c, other)
        if alt is None:
            return decision, pick
        c, other = alt
        saved = base + pick.score - best_total
        return Decision(c.node_id, c.matched_blocks,
                        f"{decision.reason}; pair searched jointly: prefill on {c.node_id} "
                        f"(est. {c.score * 1000:.0f} ms) decoding on {other.node_id} saves "
                        f"{saved * 1000:.0f} ms over {decision.node_id} + {pick.node_id}",
                        decision.candidates), other

    def commit(self, pick: DecodePick, request_id: str = "") -> None:
        """The core acted on ``pick``: advance the turn, count the transfer, remember the
        blocks on their way (until :meth:`handed_over`)."""
        if request_id and pick.transfer_blocks and pick.blocks:
            self.in_transit.add(request_id, pick.node_id, pick.blocks)
        self._turn += 1
        self.pairs += 1
        self.transferred_blocks += pick.transfer_blocks

    def handed_over(self, request_id: str) -> None:
        """The request's prefill half completed (or the request ended): its KV is on the
        decode node now, reported there by the node itself."""
        self.in_transit.release(request_id)
