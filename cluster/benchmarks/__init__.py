"""Benchmarks: each prints a markdown table naming the hardware and its baseline."""
