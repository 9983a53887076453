"""Reproducible measurements: ``python -m benchmarks.fps`` writes JSON, a markdown table and a bar chart.

Modules: ``timing`` (clocks, FPS, medians), ``machine`` (what ran it), ``storage`` (disk and emulated
device read throughput), ``stages`` (each pipeline stage alone), ``models`` (size, GFLOPs, latency per
registered model and backend), ``end_to_end`` (threaded pipeline against the naive loop), ``report``
(JSON / markdown / PNG) and ``fps`` (the CLI that runs them).
"""
