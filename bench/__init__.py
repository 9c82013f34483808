"""Benchmarks: each script warms up, repeats, prints medians and a ratio against its baseline."""
