"""Routing policies: one small interface (:mod:`router_service.policies.base`), one per file."""
