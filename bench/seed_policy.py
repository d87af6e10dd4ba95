"""``seed``: the seed notebook's "KV-aware" routing, as it was written.

The notebook keyed each prompt by ``sha256(prompt[:50]).hexdigest()[:16]``: if a node had
already been sent that key it routed there, otherwise to the node using the least cache memory
("least cache MB", here ``used_blocks``), and recorded the key on that node. Token and hash
workloads have no text, so ``prompt[:50]`` is the decimal rendering of the first token ids (or
Mooncake hash ids), space-separated, cut to 50 characters (``TraceRequest.prompt_text_head``) —
about ten ids. Kept as a row in the comparison to show what the design replaced (DESIGN §2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from router_service.policies.base import Decision, NodeView, RequestView, healthy_nodes


class SeedPolicy:
    """sha256 of the first 50 prompt characters, else least cache memory."""

    name = "seed"

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}
        self._text: dict[str, str] = {}
        self._pending: tuple[str, str] | None = None  # (request id, key) of the last choice

    def on_prompt_text(self, request_id: str, text: str) -> None:
        """The replay hands over the prompt's first characters before routing it."""
        self._text[request_id] = text

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Route to the node that saw the same 50-character key, else least cache in use."""
        live = healthy_nodes(nodes)
        text = self._text.pop(request.request_id, "") or \
            " ".join(str(h) for h in request.block_hashes[:4])
        key = hashlib.sha256(text[:50].encode()).hexdigest()[:16]
        owner = self._owner.get(key)
        self._pending = (request.request_id, key)
        for v in live:
            if v.node_id == owner:
                return Decision(v.node_id, v.matched_blocks, f"seed: key {key} seen on node")
        node = min(live, key=lambda v: v.used_blocks)
        return Decision(node.node_id, node.matched_blocks, f"seed: new key {key}; least cache")

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Record the key on the node a new key was sent to."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == request.request_id:
            self._owner.setdefault(pending[1], decision.node_id)
