"""Benchmarks (``python -m benchmarks.<name>``): each prints ratios measured side by side in one run
and writes md + json."""
