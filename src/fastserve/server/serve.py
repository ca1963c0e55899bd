"""`serve()`: load a model dir into an `AsyncEngine` and serve the OpenAI API with uvicorn.

    serve("runs/small/model", host="127.0.0.1", port=8000, policy="mlfq", api_key="secret")
    # or: fastserve serve runs/small/model --port 8000

Binds the socket itself (a busy port is a clear error; port 0 picks a free one), prints the URL when
the server is ready, logs one line per request (id, prompt/output tokens, TTFT, E2E). SIGTERM or
SIGINT: stop accepting connections, let in-flight requests finish for up to `shutdown_timeout_s`
(then cancel them, which aborts their engine requests), stop the engine and return 0. If the
engine dies of a failure no request explains, the server shuts down and returns 1.

What this module does not know: routes and schemas (app.py), scheduling (the engine).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from pathlib import Path

from fastserve.errors import ConfigError, FastServeError

logger = logging.getLogger("fastserve.server")


def _server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn.Server that announces readiness and exits normally after a signal (uvicorn
        re-raises the captured signal once shut down, which would end the process with -15)."""

        ready_message: str = ""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self.ready_message:
                print(self.ready_message, flush=True)

    return _Server


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FastServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queued_requests: int = 1024,
    max_request_tokens: int | None = None,
    max_body_bytes: int = 16 * 2**20,
    shutdown_timeout_s: float = 30.0,
    log_level: str = "info",
    **engine_options,
) -> int:
    """Serve `model_dir` until SIGTERM/SIGINT (exit status 0) or until the engine dies of a
    failure no request explains (exit status 1, so that a supervisor restarts the server)."""
    import uvicorn

    from fastserve.engine.async_engine import AsyncEngine
    from fastserve.server.app import build_app
    from fastserve.server.limits import ServerLimits

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("fastserve").setLevel(log_level.upper())
    try:
        limits = ServerLimits(
            max_queued_requests=max_queued_requests,
            max_request_tokens=max_request_tokens,
            max_body_bytes=max_body_bytes,
        )
    except ValueError as exc:
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
    if shutdown_timeout_s < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout_s}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FastServeError(f"model directory {model_dir} does not exist")
    name = served_model_name or model_dir.resolve().name
    sock = _bind(host, port)
    try:
        try:
            engine = AsyncEngine.from_model_dir(str(model_dir), **engine_options)
        except ValueError as exc:
            raise ConfigError(f"invalid engine option: {exc}") from None
        try:
            app = build_app(engine, name, api_key, limits, str(model_dir))
            config = uvicorn.Config(
                app,
                log_level=log_level.lower(),
                access_log=False,
                timeout_graceful_shutdown=shutdown_timeout_s,
                lifespan="off",
            )
            server = _server_class()(config)
            bound_host, bound_port = sock.getsockname()[:2]
            url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
            server.ready_message = (
                f"FastServe is serving {name!r} at http://{url_host}:{bound_port}/v1 "
                f"(policy={engine.engine.config.policy}, max_model_len="
                f"{engine.engine.max_model_len}, auth={'on' if api_key else 'off'})"
            )
            watchdog = threading.Thread(
                target=_stop_when_dead,
                args=(engine, server),
                name="fastserve-watchdog",
                daemon=True,
            )
            watchdog.start()
            server.run(sockets=[sock])
        finally:
            engine.shutdown()
    finally:
        sock.close()
    if engine.error is not None:
        logger.critical("server stopped: the engine died (%r); exit status 1", engine.error)
        return 1
    logger.info("server stopped")
    return 0


def _stop_when_dead(engine, server) -> None:
    """Shut the server down once the engine's step thread has died of an error (not when it
    was shut down): in-flight streams already got their error; /health said 503 meanwhile."""
    engine.wait_stopped()
    if engine.error is not None:
        server.should_exit = True
