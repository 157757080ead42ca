"""The connection pool under our HTTP transports (``transport.StreamsTransport``)."""

import httpcore


class Pool(httpcore.AsyncConnectionPool):
    """httpcore's pool, its bookkeeping linear in the connections.

    As each request starts and as each response closes, httpcore 1.0.9 looks at every
    connection and, for each idle one, counts the whole pool again (a list of all the
    connections): with a host's 32 connections warm, that was 14 % of the callback
    worker's samples (docs/performance.md, "Sixth round"). This pass does what httpcore's
    does, counting once: drop closed connections, close expired ones, close idle ones
    while more live connections than the keep-alive limit remain, then give each queued
    request a connection that can take it, a new one while under the limit, or one in
    place of an idle one.
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        kept: list[httpcore.AsyncConnectionInterface] = []
        closing: list[httpcore.AsyncConnectionInterface] = []
        for connection in self._connections:
            if connection.is_closed():
                continue
            (closing if connection.has_expired() else kept).append(connection)
        surplus = len(kept) - self._max_keepalive_connections
        for connection in [c for c in kept if c.is_idle()][: max(0, surplus)]:
            kept.remove(connection)
            closing.append(connection)
        for pool_request in [r for r in self._requests if r.is_queued()]:
            origin = pool_request.request.url.origin
            reuse = (c for c in kept if c.can_handle_request(origin) and c.is_available())
            chosen = next(reuse, None)
            if chosen is None:
                if len(kept) >= self._max_connections:
                    idle = next((c for c in kept if c.is_idle()), None)
                    if idle is None:
                        continue  # it waits for a connection to come free
                    kept.remove(idle)
                    closing.append(idle)
                chosen = self.create_connection(origin)
                kept.append(chosen)
            pool_request.assign_to_connection(chosen)
        self._connections = kept
        return closing
