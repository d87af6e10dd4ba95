"""Which nodes may serve a request, before any policy scores them.

The routing core's eligibility step (:class:`router_service.core.RouterCore` calls it between
the lookup and the policy): the model the request names (or the fleet's only one, or
``--default-model``), the placement's nodes of that model (the last known ones while the
registry is unreachable), the request's subset hint and exclusions, and, for a request that
asked for one node, only aggregated (``both``) nodes. Pure functions over a
:class:`~router_service.placement.PlacementSource`'s view; each error says what is missing and
carries the gRPC status a client can act on.
"""

from __future__ import annotations

from kvroute.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from router_service.domain import RouteRequest
from router_service.placement import NodeState, Placement, PlacementSource
from router_service.request_prep import check_id

Pairs = list[tuple[NodeState, int]]
"""Candidate nodes with the blocks each holds of the request's prefix."""


def resolve_model(model: str, default_model: str, source: PlacementSource) -> str:
    """The request's model: as given, else ``default_model``, else the fleet's only model."""
    if model:
        check_id(model, "model")
        return model
    if default_model:
        return default_model
    models = sorted({n.model for n in source.last_known()})
    if len(models) == 1:
        return models[0]
    if not models:
        if not source.connected:
            raise Unavailable(
                f"the router cannot reach its registry (no registry data for "
                f"{source.staleness_s():.1f} s) and knows no node; check --registry")
        raise Unavailable("no node is registered (model could not be defaulted)")
    raise InvalidArgument(f"model: required, the fleet serves several models "
                          f"({', '.join(models)}) and no --default-model is set")


def candidates(placement: Placement | None, degraded_why: str, model: str,
               source: PlacementSource) -> tuple[Pairs, dict[str, int]]:
    """(nodes with matched blocks, offloaded blocks by node) of ``model``: the placement's, or
    with no placement (registry unreachable: ``degraded_why``) every last known node of it."""
    off: dict[str, int] = {}
    if placement is not None:
        pairs, off = placement.nodes, placement.offloaded
    else:
        pairs = [(n, 0) for n in source.last_known() if n.model == model]
        if not pairs:
            raise Unavailable(f"registry unreachable ({degraded_why}) and no node of model "
                              f"{model!r} known; retry later")
    if not pairs:
        models = sorted({n.model for n in source.last_known()})
        if not models:
            raise Unavailable("no node is registered with the registry; retry later")
        raise NotFound(f"model: no node serves model {model!r} (served: "
                       f"{', '.join(models)})")
    return pairs, off


def restrict(req: RouteRequest, pairs: Pairs) -> Pairs:
    """Apply the request's subset hint and exclusions (by node id or address)."""
    allowed, excluded = req.allowed, req.excluded
    if allowed is None and not excluded:
        return pairs
    out = [(n, m) for n, m in pairs
           if (allowed is None or n.node_id in allowed or n.address in allowed)
           and n.node_id not in excluded and n.address not in excluded]
    if not out:
        what = "the subset hint" if allowed is not None else "the excluded nodes"
        raise Unavailable(f"no node of model {pairs[0][0].model!r} is left after "
                          f"{what} ({len(pairs)} known); retry later")
    return out


def aggregated(pairs: Pairs, model: str) -> Pairs:
    """For a request that asked for one node: the aggregated (``both``) nodes only."""
    if all(n.role == "both" for n, _ in pairs):
        return pairs
    out = [(n, m) for n, m in pairs if n.role == "both"]
    if not out:
        raise FailedPrecondition(
            f"disaggregated: model {model!r} has no aggregated ('both') node left and the "
            f"request asked for one node; send it disaggregated")
    return out
