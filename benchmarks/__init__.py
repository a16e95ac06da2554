"""Benchmarks: every runtime on the same ResNet-34 weights (run.py) and interleaved peer comparisons (peers.py)."""
