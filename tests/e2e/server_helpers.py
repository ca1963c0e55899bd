"""Shared helpers of the server tests: a tiny model dir and a real `fastserve serve` process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tiny_models import save_tiny_model_dir

CONTEXT_LEN = 2048  # the tiny model's max_position_embeddings


def make_model_dir(path: Path) -> Path:
    """The tests' tiny model (tests/tiny_models.py) with a long context for long generations."""
    return save_tiny_model_dir(path, max_position_embeddings=CONTEXT_LEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m fastserve serve MODEL_DIR --port P ...` on 127.0.0.1, ready when /health is."""

    def __init__(
        self,
        model_dir: Path,
        *args: str,
        log_path: Path | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        """`launcher`: what runs the CLI (default `python -m fastserve`), e.g. a script that
        injects faults before calling fastserve.cli.main."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(model_dir).parent / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.pop("FASTSERVE_API_KEY", None)
        cmd = [*(launcher or [sys.executable, "-m", "fastserve"]), "serve", str(model_dir)]
        cmd += ["--port", str(self.port), "--log-level", "info", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value} (labels without model_name)."""
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, value = line.rsplit(" ", 1)
            key = re.sub(r'model_name="[^"]*"', "", key)
            key = key.replace("{,", "{").replace(",}", "}").replace(",,", ",").replace("{}", "")
            out[key] = float(value)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# /metrics sample names (ServerProcess.metrics() keys, model_name label dropped)
RUNNING, WAITING = "fastserve:num_requests_running", "fastserve:num_requests_waiting"
SWAPPED, KV_USAGE = "fastserve:num_requests_swapped", "fastserve:kv_cache_usage_perc"


def counter(metrics: dict[str, float], name: str) -> float:
    """A fastserve counter's value (0 when absent) from ServerProcess.metrics()."""
    return metrics.get(f"fastserve:{name}_total", 0.0)


def finished(metrics: dict[str, float], reason: str) -> float:
    """Finished sequences with this finish reason, from ServerProcess.metrics()."""
    return metrics.get(f'fastserve:request_success_total{{finished_reason="{reason}"}}', 0.0)


@contextlib.contextmanager
def running_server(model_dir: Path, *args: str, **kwargs):
    """A ready ServerProcess for the `with` block; on leaving, SIGTERM and it must exit 0."""
    proc = ServerProcess(model_dir, *args, **kwargs)
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()[-5000:]


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll `predicate()` until it returns something truthy and return that (or fail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


async def sse_data(response: httpx.Response):
    """The `data:` payloads of a streaming httpx response, split at LF bytes only, as SSE says.
    (httpx's aiter_lines splits like str.splitlines, also at U+0085, U+2028, ..., which the
    server's JSON leaves unescaped inside generated text.)"""
    buf = b""
    async for chunk in response.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[len(b"data: ") :].rstrip(b"\r").decode()
