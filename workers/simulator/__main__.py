"""Run the upstream simulator: ``python -m workers.simulator [options]``.

Every option falls back to an environment variable ``TOLLGATE_SIM_<OPTION>`` (for example
``TOLLGATE_SIM_LATENCY``, ``TOLLGATE_SIM_SEED_RNG``) and then to the default shown by ``--help``.
One uvicorn process; it prints ``simulator listening on http://HOST:PORT`` once the socket
accepts connections (with ``--port 0`` the port is the one the OS picked), so a parent process
can wait for that line instead of polling.
"""

import argparse
import os
import socket
from collections.abc import Sequence

import uvicorn

from workers.simulator.app import (
    ERROR_KINDS,
    InvalidRequest,
    SimulatorConfig,
    create_simulator_app,
    updated_config,
)


class _AnnouncingServer(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"simulator listening on http://{host}:{port}", flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers.simulator",
        description="A simulated image upstream, in memory: Krea 2 async jobs, SiliconFlow-style "
        "synchronous generation, and under /unified, /openai and /bfl the unified API, OpenAI "
        "Images and Black Forest Labs.",
    )

    def option(
        flag: str, kind: type, default: str, text: str, choices: Sequence[str] | None = None
    ) -> None:
        # Read at parse time, never at import; argparse applies `kind` to string defaults too.
        env = "TOLLGATE_SIM_" + flag.removeprefix("--").replace("-", "_").upper()
        default = os.environ.get(env, default)
        parser.add_argument(
            flag, type=kind, default=default, choices=choices, help=f"{text} (${env})"
        )

    option("--host", str, "127.0.0.1", "interface to bind")
    option("--port", int, "8100", "port to bind, 0 for any free port")
    option("--api-key", str, "sim-key", "the key clients must send (Bearer, or BFL's x-key)")
    option("--latency", float, "0.5", "seconds from submit to a final job status")
    option("--failure-rate", float, "0.0", "chance, 0..1, that a job ends failed")
    option("--error-kind", str, "none", "fault to inject", choices=ERROR_KINDS)
    option("--retry-after", int, "1", "Retry-After seconds sent with submit_429")
    option("--hang-seconds", float, "30", "how long hang (submit) and slow_poll (poll) sleep")
    option("--fail-first-n", int, "0", "answer the first N submits with 500")
    option("--seed-rng", int, "0", "seed of the simulator's random choices")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = updated_config(
            SimulatorConfig(api_key=args.api_key),
            {
                "latency": args.latency,
                "failure_rate": args.failure_rate,
                "error_kind": args.error_kind,
                "retry_after": args.retry_after,
                "hang_seconds": args.hang_seconds,
                "fail_first_n": args.fail_first_n,
                "rng_seed": args.seed_rng,
            },
        )
    except InvalidRequest as exc:
        parser.error(str(exc))
    server = _AnnouncingServer(
        uvicorn.Config(
            create_simulator_app(config),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            # A hanging submit must not hold up a test run's teardown for hang_seconds.
            timeout_graceful_shutdown=1,
        )
    )
    server.run()


if __name__ == "__main__":
    main()
