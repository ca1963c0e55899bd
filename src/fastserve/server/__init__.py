"""`fastserve.server`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over `AsyncEngine`.

    from fastserve.server import serve
    serve("runs/small/model", port=8000)          # = `fastserve serve runs/small/model`

    from fastserve.server import build_app        # the ASGI app, for embedding or tests
    app = build_app(AsyncEngine.from_model_dir(path), served_model_name="small")

Modules: protocol.py (pydantic OpenAI schemas), responses.py (engine outputs -> responses and
stream chunks), app.py (routes, SSE, auth, limits), streams.py (merging engine streams, client
disconnects), metrics.py (Prometheus), serve.py (uvicorn process, signals). Knows nothing about
scheduling or tensors.
"""

from fastserve.server.app import build_app
from fastserve.server.serve import serve

__all__ = ["build_app", "serve"]
