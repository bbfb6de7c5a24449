"""Benchmarks of the shipped code, run from the repository root as `python -m benchmarks.NAME --json OUT.json`.

Each module measures what accelc itself compiles and runs (its passes, loops and timing workers,
on artifacts compiled from recipes/bench/*.yaml) and writes rows, a protocol and a plot through
benchmarks/common.py.
"""
