"""The upstream simulator: a stand-alone HTTP server speaking the Krea 2 async-jobs protocol.

It stands in for a real image provider in tests, benchmarks and local runs, with knobs for
latency and for the failures a real upstream shows (5xx, 429, hangs, bad bodies, bad images).
It knows nothing about Tollgate's gateway. Run it with ``python -m workers.simulator``; the wire
protocol is described in ``workers.simulator.app``.
"""
