"""Engine blocks → kvroute canonical blocks, so the registry can be told what the engine holds.

Every engine block the agent has seen stored gets an entry keyed by its engine hash: the
canonical blocks it completed, the canonical chain state after it (the last canonical hash and
the tokens of a canonical block not yet complete), and the media holding it. Canonical hashes
come only from ``token_ids`` (``kvroute.blocks.hash_blocks(..., parent=...)``), never from
engine hashes, so they match what the router computes for the same tokens.

Decisions (documented in README.md):

- A run whose parent is None starts at the canonical root of its salt (LoRA name/id and
  ``cache_salt`` give different roots, so adapter/salted blocks never match plain prompts).
- A run whose parent engine hash is unknown (the agent joined late, or lost events) is skipped
  and counted as ``orphan``: its tokens alone cannot name the prefix. A resync would not help
  (it sends what the agent knows); the replay-from-0 at startup is the recovery.
- Engine block size may differ from kvroute's: blocks are re-chunked (a 32-token engine block
  completes two 16-token canonical blocks; 1-token SGLang pages are buffered until 16 tokens
  complete one). A partial engine block (SGLang's last page) completes nothing and ends the
  chain: it is never indexed as a full block.
- LoRA names and cache salts reach the canonical root salt (``kvroute.blocks.request_salt``),
  the same salt the router derives from RouteRequest.lora_name / cache_salt. Blocks whose
  ``extra_keys`` hold keys a request cannot reproduce (multimodal ids, embedding digests) are
  unmatchable: they and their descendants are not indexed and are counted
  (``unreproducible_extra_keys``), never indexed under hashes nobody can look up.
- The engine's own block size (``engine_block_size``: configured, else the largest block size
  seen) and its lookahead tokens are reported to the registry so the router rounds matches
  down to whole engine blocks. A BlockStored smaller than the engine block size is a partial
  page (SGLang sends one as its own event): never indexed, nothing chains from it.
- Media: policy ``device`` indexes the device cache (``GPU``) as the node's blocks and reports
  blocks held on other media (``CPU``, ``CPU_PINNED``, ``DISK``...) as a lower tier
  (``stored_offloaded`` / ``removed_offloaded`` in the heartbeat); ``any`` counts offloaded
  copies as cached like device ones. A block on several media stays in a tier while one of
  that tier's media holds it. Groups other than 0 of hybrid models are ignored (counted).
- When more canonical blocks are held than ``capacity_blocks`` (stale after lost events), the
  oldest entries are trimmed and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from kvroute.blocks import hash_blocks, request_salt, root_hash
from node_agent.deltas import DeltaLog
from node_agent.events import DEVICE_MEDIUM, Cleared, Event, Removed, Stored

log = logging.getLogger(__name__)

MEDIUM_POLICIES = ("device", "any")
"""Accepted values of the medium policy setting."""


@dataclass(slots=True)
class _Entry:
    canon: tuple[int, ...]
    last: int
    rem: tuple[int, ...]
    media: set[str]
    before: int
    partial: bool = False
    opaque: bool = False


def salt_of(ev: Stored) -> str:
    """The canonical-root salt of a run: '' for base-model blocks, else LoRA and cache salt."""
    return request_salt(ev.lora_name, ev.lora_id, ev.cache_salt)


class BlockMap:
    """The agent's view of the engine cache in canonical hashes; reports changes to a DeltaLog."""

    def __init__(self, block_size: int, deltas: DeltaLog, *, medium_policy: str = "device",
                 device_media: tuple[str, ...] = (DEVICE_MEDIUM,), capacity_blocks: int = 0,
                 engine_block_size: int = 0) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if medium_policy not in MEDIUM_POLICIES:
            raise ValueError(f"medium policy must be one of {MEDIUM_POLICIES}")
        self.block_size = block_size
        self._deltas = deltas
        self._any_medium = medium_policy == "any"
        self._device = frozenset(m.upper() for m in device_media)
        self.capacity_blocks = capacity_blocks
        self._entries: dict[int, _Entry] = {}
        self._refs: dict[int, int] = {}
        self._off_refs: dict[int, int] = {}
        self._root = root_hash("")
        self.evictions_total = 0
        self.skipped: Counter[str] = Counter()
        self.engine_block_sizes: set[int] = set()
        self._engine_bs = engine_block_size
        self.lookahead_tokens = 0

    # --- queries -------------------------------------------------------------------------
    @property
    def held_blocks(self) -> int:
        """Distinct canonical blocks the engine holds (what the registry indexes)."""
        return len(self._refs)

    @property
    def engine_blocks(self) -> int:
        """Engine blocks tracked."""
        return len(self._entries)

    @property
    def engine_block_size(self) -> int:
        """The engine's block (page) size: configured, else the largest seen (0 = none yet)."""
        return self._engine_bs or max(self.engine_block_sizes, default=0)

    def canonical_hashes(self) -> list[int]:
        """Every canonical hash held now (the full set for a Resync)."""
        return list(self._refs)

    @property
    def offloaded_blocks(self) -> int:
        """Distinct canonical blocks held on an offloading medium (the lower tier)."""
        return len(self._off_refs)

    def offloaded_hashes(self) -> list[int]:
        """Every canonical hash held on an offloading medium (for a Resync)."""
        return list(self._off_refs)

    def canonical_of(self, engine_hash: int) -> tuple[int, ...] | None:
        """Canonical blocks completed by an engine block (None if unknown)."""
        e = self._entries.get(engine_hash)
        return None if e is None else e.canon

    # --- updates -------------------------------------------------------------------------
    def apply(self, ev: Event) -> None:
        """Apply one engine event."""
        if isinstance(ev, Stored):
            self._store(ev)
        elif isinstance(ev, Removed):
            self._remove(ev)
        elif isinstance(ev, Cleared):
            self.clear()

    def clear(self) -> None:
        """Drop everything (engine restart or AllBlocksCleared)."""
        self._entries.clear()
        self._refs.clear()
        self._off_refs.clear()
        self._deltas.cleared()

    def _medium_ok(self, medium: str, group_idx: int | None) -> bool:
        if group_idx not in (None, 0):
            self.skipped["other_group"] += 1
            return False
        return True

    def _is_dev(self, medium: str) -> bool:
        return self._any_medium or medium in self._device

    def _add_medium(self, e: _Entry, medium: str) -> None:
        """``medium`` now holds the engine block: enter its canonical blocks in that tier."""
        if medium in e.media:
            return
        dev = self._is_dev(medium)
        had = any(self._is_dev(m) == dev for m in e.media)
        e.media.add(medium)
        if not had:
            for c in e.canon:
                if dev:
                    self._incref(c)
                else:
                    self._incref_off(c)

    def _drop_medium(self, e: _Entry, medium: str) -> None:
        """``medium`` no longer holds the engine block."""
        if medium not in e.media:
            return
        e.media.discard(medium)
        dev = self._is_dev(medium)
        if any(self._is_dev(m) == dev for m in e.media):
            return
        for c in e.canon:
            if not dev:
                self._decref_off(c)
            elif self._decref(c):
                self.evictions_total += 1

    def _incref_off(self, h: int) -> None:
        n = self._off_refs.get(h, 0)
        self._off_refs[h] = n + 1
        if n == 0:
            self._deltas.stored_offloaded(h)

    def _decref_off(self, h: int) -> None:
        n = self._off_refs.get(h, 0)
        if n <= 1:
            if n == 1:
                del self._off_refs[h]
                self._deltas.removed_offloaded(h)
            return
        self._off_refs[h] = n - 1

    def _incref(self, h: int) -> None:
        n = self._refs.get(h, 0)
        self._refs[h] = n + 1
        if n == 0:
            self._deltas.stored(h)

    def _decref(self, h: int) -> bool:
        n = self._refs.get(h, 0)
        if n <= 1:
            if n == 1:
                del self._refs[h]
                self._deltas.removed(h)
                return True
            return False
        self._refs[h] = n - 1
        return False

    def _store(self, ev: Stored) -> None:
        if not self._medium_ok(ev.medium, ev.group_idx):
            return
        ebs, hashes, toks = ev.block_size, ev.engine_hashes, ev.token_ids
        n = len(hashes)
        if n == 0:
            return
        if not (n - 1) * ebs < len(toks) <= n * ebs:
            self.skipped["malformed"] += 1
            log.warning("BlockStored with %d hashes but %d tokens at block size %d: skipped",
                        n, len(toks), ebs)
            return
        known = self.engine_block_size
        self.engine_block_sizes.add(ebs)
        self.lookahead_tokens = max(self.lookahead_tokens, ev.lookahead_tokens)
        short_page = 0 < ebs < known  # SGLang's partial last page, sent as its own event
        opaque = False
        if ev.parent_engine_hash is None:
            salt = salt_of(ev)
            last = root_hash(salt) if salt else self._root
            rem: tuple[int, ...] = ()
        else:
            parent = self._entries.get(ev.parent_engine_hash)
            if parent is None or parent.partial:
                self.skipped["orphan"] += n
                return
            last, rem, opaque = parent.last, parent.rem, parent.opaque
        bs, extra = self.block_size, ev.extra_keys
        if (ebs == bs and not rem and extra is None and not opaque and not short_page
                and len(toks) == n * bs
                and not any(eh in self._entries for eh in hashes)):
            # fast path (the common case): one hashing call for the whole run
            for eh, c in zip(hashes, hash_blocks(toks, bs, parent=last), strict=True):
                entry = self._entries[eh] = _Entry((c,), c, (), set(), last)
                self._add_medium(entry, ev.medium)
                last = c
            self._trim_if_over()
            return
        for i, eh in enumerate(hashes):
            chunk = toks[i * ebs:(i + 1) * ebs]
            known_e = self._entries.get(eh)
            if known_e is not None:  # re-store, or the same block on another medium
                if known_e.before != last:
                    # the same engine id after another prefix: unchained engine hashes (old
                    # SGLang). Removals cannot tell the two apart; keep the first, count it.
                    self.skipped["engine_hash_conflict"] += 1
                self._add_medium(known_e, ev.medium)
                last, rem, opaque = known_e.last, known_e.rem, known_e.opaque
                continue
            if len(chunk) < ebs or short_page:  # partial page: never a full block
                self._entries[eh] = _Entry((), last, rem, {ev.medium}, last, partial=True)
                self.skipped["partial_block"] += 1
                return
            before = last
            if opaque or (extra is not None and i < len(extra) and extra[i] is not None):
                # keys a request cannot carry (multimodal ids...): this block and every block
                # after it in the chain can never match a Route; not indexed, counted.
                self._entries[eh] = _Entry((), last, rem, {ev.medium}, before, opaque=True)
                opaque = True
                self.skipped["unreproducible_extra_keys"] += 1
                continue
            buf = rem + chunk
            full = len(buf) // bs
            canon: tuple[int, ...] = ()
            if full:
                canon = tuple(hash_blocks(buf[:full * bs], bs, parent=last))
                last, rem = canon[-1], buf[full * bs:]
            else:
                rem = buf
            entry = self._entries[eh] = _Entry(canon, last, rem, set(), before)
            self._add_medium(entry, ev.medium)
        self._trim_if_over()

    def _trim_if_over(self) -> None:
        if self.capacity_blocks and len(self._refs) > self.capacity_blocks:
            self._trim()

    def _remove(self, ev: Removed) -> None:
        if not self._medium_ok(ev.medium, ev.group_idx):
            return
        for eh in ev.engine_hashes:
            e = self._entries.get(eh)
            if e is None:
                self.skipped["unknown_removed"] += 1
                continue
            self._drop_medium(e, ev.medium)
            if not e.media:
                del self._entries[eh]

    def _trim(self) -> None:
        over = len(self._refs) - self.capacity_blocks
        if self.skipped["trimmed"] == 0:
            log.warning("more canonical blocks held (%d) than --capacity-blocks %d: trimming the "
                        "oldest (stale after lost events, or the capacity is set too low)",
                        len(self._refs), self.capacity_blocks)
        while over > 0 and self._entries:
            eh = next(iter(self._entries))
            e = self._entries.pop(eh)
            dev = any(self._is_dev(m) for m in e.media)
            if any(not self._is_dev(m) for m in e.media):
                for c in e.canon:
                    self._decref_off(c)
            for c in e.canon if dev else ():
                if self._decref(c):
                    over -= 1
                    self.skipped["trimmed"] += 1
