"""Offline evaluation jobs (run from the checkout: `python -m eval.run ...`; not installed).

The metric math and feature extractors live in `avgen.metrics`; this package reads clips from
disk, runs the metrics and writes the report, summary and plots.
"""
