"""A generation running beside the page's event handler, so that the handler can stream its previews
and stop it.

Gradio streams what a generator event yields, but the sampler's loop is not a generator: the work runs
in a thread of its own and hands its previews to a queue the handler reads. The handler yields at least
every `heartbeat` seconds, because Gradio can close it (the Stop button, a client that went away) only
between two yields; closing it stops the job, which ends at its next model call.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from typing import Callable, Iterator

PREVIEW, WAITING, DONE, FAILED = "preview", "waiting", "done", "failed"


class Job:
    """Runs `work(job)` in a thread. The work reports with `job.preview(...)` and polls `job.stopping`
    (a threading.Event); `updates()` yields what the handler should show, ending with DONE or FAILED."""

    def __init__(self, work: Callable[["Job"], object]):
        self.stopping = threading.Event()
        self._messages: queue.Queue = queue.Queue()
        # The thread runs in a copy of the caller's context, so that Gradio's progress tracking (a
        # context variable) still reaches the page from inside the work, e.g. for a download.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run, work), daemon=True, name="fastdit-app-job")
        self._thread.start()

    def _run(self, work) -> None:
        try:
            self._messages.put((DONE, work(self)))
        except BaseException as err:  # noqa: BLE001 - every outcome goes back to the page
            self._messages.put((FAILED, err))

    def preview(self, *value) -> None:
        self._messages.put((PREVIEW, value))

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def updates(self, heartbeat: float = 0.5) -> Iterator[tuple[str, object]]:
        """(PREVIEW, args) for the latest preview only (older ones are skipped when the page is behind),
        (WAITING, None) after `heartbeat` seconds without news, and last (DONE, result) or (FAILED, error)."""
        while True:
            try:
                message = self._messages.get(timeout=heartbeat)
            except queue.Empty:
                yield WAITING, None
                continue
            while message[0] == PREVIEW and not self._messages.empty():
                message = self._messages.get_nowait()
            yield message
            if message[0] in (DONE, FAILED):
                return
