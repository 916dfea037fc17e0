"""Benchmarks: each prints ratios measured side by side in one run and writes md + json (python -m benchmarks.<name>)."""
