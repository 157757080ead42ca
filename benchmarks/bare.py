"""The ceiling: a bare litestar endpoint, served by ``gateway.server.run`` like the gateway.

``python -m benchmarks.bare --port P [--workers N]`` serves ``GET /ping`` (``{"status":"ok"}``)
with nothing behind it; the benchmark reports every path as a ratio to it, measured in the
same run on the same machine.
"""

import argparse

from litestar import Litestar, get

from gateway import server


@get("/ping", sync_to_thread=False)
def ping() -> dict[str, str]:
    return {"status": "ok"}


def create_bare_app() -> Litestar:
    return Litestar(route_handlers=[ping], logging_config=None, openapi_config=None)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    server.run(
        "benchmarks.bare:create_bare_app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        shutdown_grace_seconds=1,
    )


if __name__ == "__main__":
    main()
