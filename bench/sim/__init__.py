"""In-process fleet simulation: LRU block caches, prefill queues, decode batches, event replay."""
