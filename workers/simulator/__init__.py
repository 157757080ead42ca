"""The upstream simulator: a stand-alone HTTP server standing in for real image providers.

It speaks two wire protocols at once: Krea 2 async jobs (submit, poll, cancel) and
SiliconFlow-style synchronous generation (one ``POST /v1/images/generations``), over one job
store. It serves tests, benchmarks and local runs, with knobs for latency and for the failures
a real upstream shows (5xx, 429, hangs, bad bodies, bad images). It knows nothing about
Tollgate's gateway. Run it with ``python -m workers.simulator``; the protocols are described in
``workers.simulator.app`` and ``workers.simulator.siliconflow``.
"""
