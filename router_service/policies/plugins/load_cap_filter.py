"""Filter ``load_cap``: a node is eligible only while it is not far ahead of the fleet.

Its in-flight count plus this request must stay <= ``factor`` x the fleet's mean in-flight count
(counting this request) + ``slack``. A prefix every request shares therefore cannot pile
everything onto one node: that node leaves the eligible set as soon as it is ahead. The
least-loaded node is always under the cap, so the filter never empties the set.
"""

from __future__ import annotations

from router_service.policies.plugins.interfaces import Cycle


class LoadCapFilter:
    """Excludes nodes whose in-flight count would exceed the cap."""

    name = "load_cap"

    def __init__(self, factor: float, slack: float, spare_prefill_only: bool = False) -> None:
        self.factor = factor
        self.slack = slack
        self.spare_prefill_only = spare_prefill_only

    def cap(self, cycle: Cycle) -> float:
        """The cap of this cycle, in requests."""
        mean = (cycle.total_inflight + 1) / (cycle.fleet_nodes or len(cycle.nodes))
        return self.factor * mean + self.slack

    def exclusions(self, cycle: Cycle) -> list[str]:
        """Nodes whose in-flight + 1 is over the cap."""
        cap = self.cap(cycle)
        spare = self.spare_prefill_only
        return [f"in-flight {v.inflight} over cap {cap:.1f}"
                if v.inflight + 1 > cap and not (spare and v.role == "prefill") else ""
                for v in cycle.nodes]

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Stateless."""
