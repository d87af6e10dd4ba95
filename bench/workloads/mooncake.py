"""Mooncake-format JSONL traces (FAST'25 release): one request per line.

Fields: ``timestamp`` (ms from trace start), ``input_length``, ``output_length`` and ``hash_ids``
(prefix-chained block ids, 512 tokens per block; ``len(hash_ids) == ceil(input_length / 512)``,
so the last block is usually partial). The ids are used directly as canonical block hashes
(DESIGN §2). The trace has no text and no session ids; for the seed notebook's policy the "first
50 characters of the prompt" are the decimal rendering of the first hash ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.workloads.base import TraceRequest, Workload, hash_ids_text

MOONCAKE_BLOCK_SIZE = 512
"""Tokens per ``hash_ids`` block in Mooncake traces."""


class TraceFormatError(ValueError):
    """A trace line is not Mooncake format (the message names the file and line)."""


def load_mooncake(path: str | Path, *, start: int = 0, limit: int | None = None,
                  block_size: int = MOONCAKE_BLOCK_SIZE) -> Workload:
    """Read a Mooncake JSONL trace; ``start``/``limit`` select lines (arrivals re-based to 0)."""
    p = Path(path)
    reqs: list[TraceRequest] = []
    with p.open("r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno <= start:
                continue
            if limit is not None and len(reqs) >= limit:
                break
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                ids = tuple(int(x) for x in rec["hash_ids"])
                req = TraceRequest(
                    request_id=f"{p.stem}-{lineno}",
                    arrival_s=float(rec["timestamp"]) / 1000.0,
                    block_hashes=ids,
                    prompt_tokens=int(rec["input_length"]),
                    output_tokens=max(1, int(rec["output_length"])),
                    prompt_text_head=hash_ids_text(ids),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise TraceFormatError(f"{p}:{lineno}: not a Mooncake trace line ({exc})") from exc
            reqs.append(req)
    reqs.sort(key=lambda r: r.arrival_s)
    if reqs and reqs[0].arrival_s:
        t0 = reqs[0].arrival_s
        reqs = [TraceRequest(r.request_id, r.arrival_s - t0, r.block_hashes, r.prompt_tokens,
                             r.output_tokens, r.session_key, r.prompt_text_head) for r in reqs]
    name = p.stem if start == 0 and limit is None else \
        f"{p.stem}[{start}:{start + len(reqs)}]"
    return Workload(name, block_size, reqs, source=str(p),
                    meta={"format": "mooncake", "start": start, "limit": limit})
