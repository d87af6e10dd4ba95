"""Filter ``health``: only nodes the registry reports healthy (never a draining or late one)."""

from __future__ import annotations

from router_service.policies.plugins.interfaces import Cycle


class HealthFilter:
    """Excludes unhealthy nodes (the scheduler already drops them; kept explicit for reasons)."""

    name = "health"

    def exclusions(self, cycle: Cycle) -> list[str]:
        """"unhealthy" for nodes that are not healthy."""
        return ["" if v.healthy else "unhealthy" for v in cycle.nodes]

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Stateless."""
