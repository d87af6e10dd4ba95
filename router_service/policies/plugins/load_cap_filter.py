"""Filter ``load_cap``: a node is eligible only while it is not far ahead of the fleet.

Its in-flight count plus this request must stay <= ``factor`` x the fleet's mean in-flight count
(counting this request) + ``slack``. A prefix every request shares therefore cannot pile
everything onto one node: that node leaves the eligible set as soon as it is ahead. The
least-loaded node is always under the cap, so the filter never empties the set.

**Prefill-only nodes are not capped** (the prefill half of a disaggregated pair, role
``prefill``). On an aggregated node the in-flight count stands for what no other figure
shows — decoding requests occupying its batch and KV — so counting requests is the guard. A
prefill-only node decodes nothing: its in-flight requests are its prefill queue, which the
``queued_prefill`` scorer already prices in seconds (queued uncached tokens / rate). Counting
them again excluded the node that was fastest for the request whenever its queue held many
mostly-cached requests (measured, ``kvroute bench --mode sim --prefill-nodes 6 --decode-nodes
2`` on the shipped sample: a 107-block follow-up sent off its prefix node, estimated 12.9 s
there, to a node estimated at 84.6 s). A shared prefix still cannot pile everything onto one
prefill node: each request routed there raises its queued prefill, until a node without the
prefix wins, computes it once and competes from then on.
"""

from __future__ import annotations

from router_service.policies.plugins.interfaces import Cycle

UNCAPPED_ROLES = frozenset({"prefill"})
"""Node roles the cap does not apply to (module docstring)."""


class LoadCapFilter:
    """Excludes nodes whose in-flight count would exceed the cap (prefill-only nodes never)."""

    name = "load_cap"

    def __init__(self, factor: float, slack: float) -> None:
        self.factor = factor
        self.slack = slack

    def cap(self, cycle: Cycle) -> float:
        """The cap of this cycle, in requests."""
        mean = (cycle.total_inflight + 1) / (cycle.fleet_nodes or len(cycle.nodes))
        return self.factor * mean + self.slack

    def exclusions(self, cycle: Cycle) -> list[str]:
        """Nodes whose in-flight + 1 is over the cap (prefill-only nodes are never excluded)."""
        cap = self.cap(cycle)
        return [f"in-flight {v.inflight} over cap {cap:.1f}"
                if v.inflight + 1 > cap and v.role not in UNCAPPED_ROLES else ""
                for v in cycle.nodes]

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Stateless."""
