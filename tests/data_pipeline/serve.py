"""A real HTTP server on 127.0.0.1 serving a directory, in a thread, for the remote-reading tests;
it can fail chosen files a given number of times first (a flaky object store)."""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    failures: dict  # URL path -> (failures left, HTTP status)
    requests: list

    def do_GET(self):
        self.requests.append(self.path)
        left, status = self.failures.get(self.path, (0, 0))
        if left:
            self.failures[self.path] = (left - 1, status)
            self.send_error(status)
            return
        super().do_GET()

    def log_message(self, *args):  # quiet test output
        pass


@contextmanager
def serve(directory: str | Path):
    """Yields (base URL of `directory`, failures dict, list of requested paths)."""
    failures, requests = {}, []
    handler = type("Handler", (_Handler,), {"failures": failures, "requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", failures, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
