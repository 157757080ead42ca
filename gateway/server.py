"""How an HTTP app of ours is served: one function, so the gateway and the benchmark's bare
endpoint (``benchmarks/bare.py``) run on exactly the same server, loop and HTTP parser.

The runtime is uvloop's event loop and httptools' HTTP/1.1 parser: on the same app they
serve about twice the requests per CPU second of the plain asyncio loop and h11
(docs/performance.md). ``workers`` > 1 forks that many processes sharing the listening
socket; each builds its own app from the factory (its own pools), so nothing is shared
between them but the port. The supervisor checks each child every half second and
replaces one that does not answer within ``HEALTHCHECK_SECONDS``; uvicorn's 5 s default
replaced children that were merely slow to import on a loaded machine.
"""

import uvicorn

HEALTHCHECK_SECONDS = 30


def run(
    factory: str,
    *,
    host: str,
    port: int,
    workers: int,
    log_level: str,
    shutdown_grace_seconds: int,
) -> None:
    """Serve ``factory`` (``module:function`` returning an ASGI app) until stopped."""
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        log_config=None,  # uvicorn's lines go through our JSON handler
        access_log=False,
        timeout_graceful_shutdown=shutdown_grace_seconds,
        timeout_worker_healthcheck=HEALTHCHECK_SECONDS,
    )
