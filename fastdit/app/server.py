"""Serving the page on this machine only.

Listening on 127.0.0.1 keeps other machines out, but not other web sites: a page on evil.example can
point its own name at 127.0.0.1 (DNS rebinding) and then talk to the app as a same-origin page. Such a
request still carries the foreign name in its Host header, so the server answers only requests whose
Host is the loopback address or the name it serves under.
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"
LOCAL_NAMES = ("127.0.0.1", "localhost")
# Waiting generations beyond the running one; more are refused at once instead of queueing for hours.
MAX_QUEUED = 16


def allowed_hosts(server_name: str = LOOPBACK) -> list[str]:
    """The Host header names the server answers (any port): the local names and its own address."""
    return sorted({*LOCAL_NAMES, server_name})


def host_check(server_name: str = LOOPBACK):
    """Starlette's host check, which answers 400 to any other Host header, as FastAPI middleware."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    return Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(server_name))


def serve(page, port: int, css: str | None = None):
    """Start the page on 127.0.0.1:`port` without blocking; returns Gradio's FastAPI app."""
    page.queue(max_size=MAX_QUEUED)
    app, _, _ = page.launch(server_name=LOOPBACK, server_port=port, quiet=True, footer_links=[], css=css,
                            prevent_thread_lock=True, app_kwargs={"middleware": [host_check(LOOPBACK)]})
    return app
