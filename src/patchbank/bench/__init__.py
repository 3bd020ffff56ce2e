"""Benchmarks behind ``scripts/bench_*.py``: stage speed, quality over settings, predictions."""
