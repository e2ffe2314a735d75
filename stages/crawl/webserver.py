"""A loopback HTTP server for a local folder: the demo web, and the crawl tests.

It binds 127.0.0.1 only and lives in a daemon thread of the calling process, so it can never
outlive the process that started it, even one killed with SIGKILL.
"""

import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.errors import UserError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # one line per request would drown the crawl's output
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # img2dataset opens many connections at once


@contextmanager
def serve_folder(folder: str | Path, port: int = 0):
    """Serve ``folder`` on http://127.0.0.1:PORT while the block runs; yields the base URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"cannot serve {folder}: no such folder (for the demo web run `make demo-data`)")
    try:
        server = _Server(("127.0.0.1", port), partial(_QuietHandler, directory=str(folder)))
    except OSError as e:
        raise UserError(f"cannot serve {folder} on 127.0.0.1:{port}: {e}; "
                        "is another crawl running? set data.serve_port to a free port") from e
    thread = threading.Thread(target=server.serve_forever, name="loopback-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
