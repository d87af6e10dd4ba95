"""Re-implementations of peer routers' published policies, for the in-process bench only.

They are not served by the router. Each file re-implements one policy from the peer's source
(cited in its docstring) on kvroute's :class:`router_service.policies.base.NodeView`, plus the
state the peer keeps itself (fed by the replay's ``on_routed`` / ``on_prefill_done`` /
``on_complete`` callbacks). The real peer routers are measured by ``--mode stack --peers``.
"""
