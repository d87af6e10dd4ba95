"""Benchmarks: trace loading, replay (in-process and through the stack), bounds, reports."""
