"""Scheduling plugins: filters, scorers and a picker, composed into a policy.

In the spirit of the Gateway API Inference Extension's scheduler (``pkg/epp/scheduling``): a
policy is Filter(s) -> weighted Scorer(s) -> Picker, each a small object with a typed name.
:mod:`.interfaces` declares them and imports no implementation; each implementation is one
module; :mod:`.scheduler` composes them. ``kv_aware`` is built this way
(:mod:`router_service.policies.kv_aware`).
"""
