"""Tollgate's benchmark (``python3 scripts/dev.py bench``); see ``benchmarks/run.py``."""
