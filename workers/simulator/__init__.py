"""The upstream simulator: a stand-alone HTTP server standing in for real image providers.

It speaks five wire protocols at once over one job store: Krea 2 async jobs (submit, poll,
cancel), SiliconFlow-style synchronous generation, and, each under its own path prefix, the
unified API of seeds/002 (``/unified``), OpenAI Images (``/openai``) and Black Forest Labs
(``/bfl``). It serves tests, benchmarks and local runs, with knobs for latency and for the
failures a real upstream shows (5xx, 429, hangs, bad bodies, bad images). It knows nothing
about Tollgate's gateway. Run it with ``python -m workers.simulator``; the protocols are
described in ``workers.simulator.app`` and the modules it names.
"""
