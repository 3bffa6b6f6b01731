"""``python -m ehrxdiff.bench``: benchmarks that print speed and memory figures (``cli``); targets are checked here,
not by timed tests.
"""
