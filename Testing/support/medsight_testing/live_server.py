"""A real uvicorn server on a free loopback port, in a background thread, for end-to-end tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from medsight.server.protocol import http_protocol
from medsight_testing.processes import free_port

__all__ = ["free_port", "live_server"]  # free_port: where the engine's tests have always imported it from




@contextlib.contextmanager
def live_server(app, host: str = "127.0.0.1", port: int | None = None,
                send_buffer: int | None = None, protocol: type | None = None,
                grace_s: float | None = None) -> Iterator[str]:
    """Serve `app` until the block ends; yields the base URL (http://127.0.0.1:PORT). `port`: a given free port.
    `send_buffer`: the connections' kernel send buffer in bytes (SO_SNDBUF), so that a client that stops reading
    blocks the server's writes after kilobytes instead of the default megabytes. `protocol`: the HTTP protocol class,
    by default the one `medsight serve` runs (`http_protocol`). `grace_s`: at the block's end, open requests get this
    long before they are cancelled, as `medsight serve` stops (default: as long as they take)."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                           http=protocol or http_protocol(), timeout_graceful_shutdown=grace_s))
    sockets = None
    if send_buffer is not None:  # accepted connections inherit the listening socket's buffer size
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        listener.bind((host, port))
        sockets = [listener]
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
