"""Downloads a URL list from the web may ask for: only the schemes allowed, within a wall-clock deadline,
up to a size.

img2dataset fetches each URL with ``urllib.request.urlopen(url, timeout=...)``: any scheme urllib
knows (``file://`` copies a local file into the shards, ``data:`` is "downloaded"), and the timeout
bounds each socket operation, not the download, so a server that sends a byte a second holds a
thread (and its shard) for as long as it likes. img2dataset has no hook for either, so the crawl
swaps in, for the duration of ``download()``, a ``Downloader`` subclass whose only difference is
that the processes it is unpickled in fetch through ``fetch`` below instead of img2dataset's
``download_image`` (same signature, same return value). The swap is undone when the crawl ends.

``fetch`` opens only http(s) through an opener without file, ftp or data handlers (so a redirect
to another scheme fails too), closes the connection when the deadline passes (a watchdog timer
shuts the socket down, which unblocks a read stuck in the headers as well as in the body), and
stops reading past ``max_bytes`` (or refuses a larger announced Content-Length at once), and refuses an
image whose header says it has more than ``max_image_area`` pixels before anything decodes it.
"""

import importlib
import io
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.client import HTTPConnection, HTTPSConnection
from urllib.parse import urlsplit

from PIL import Image

# the modules, not the functions of the same names that img2dataset's __init__ exports
i2d_downloader = importlib.import_module("img2dataset.downloader")
i2d_main = importlib.import_module("img2dataset.main")
_ORIGINAL_DOWNLOAD_IMAGE = i2d_downloader.download_image
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_CHUNK = 1 << 16

# the limits of this process's crawl: set where the downloader is unpickled (each img2dataset process)
LIMITS = {"schemes": ("http", "https"), "max_bytes": 50 << 20, "max_image_area": float("inf")}


class Deadline:
    """Shuts down every socket registered with it once ``seconds`` have passed."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        self._sockets.append(sock)
        if self.expired:
            self._expire()

    def _expire(self) -> None:
        self.expired = True
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def _watched(connection_class, deadline: Deadline):
    """An http.client connection class whose socket the deadline shuts down."""
    class Connection(connection_class):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    return Connection


def _opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """http and https only (no file, ftp, data handlers), redirects followed within them."""
    http_connection, https_connection = _watched(HTTPConnection, deadline), _watched(HTTPSConnection, deadline)

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_connection, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_connection, req, context=self._context)

    opener = urllib.request.OpenerDirector()
    for handler in (Http(), Https(), urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _image_area(body: io.BytesIO) -> int:
    """Width × height from the image's header (PIL reads no pixels to tell); 0 when PIL cannot tell (the
    decoder will then say what is wrong with it)."""
    try:
        with Image.open(body) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 — not an image PIL knows: img2dataset's decoder reports it
        return 0
    finally:
        body.seek(0)
    return width * height


def fetch(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's ``download_image``, guarded: ``(key, BytesIO or None, error or None)``."""
    key, url = row
    scheme = urlsplit(str(url)).scheme.lower()
    if scheme not in LIMITS["schemes"]:
        return key, None, f"refused scheme {scheme or 'none'!r}: only {', '.join(LIMITS['schemes'])} are fetched"
    if scheme not in ("http", "https"):  # a scheme the user allowed (file: source folder): img2dataset's own
        return _ORIGINAL_DOWNLOAD_IMAGE(row, timeout, user_agent_token, disallowed_header_directives)
    agent = _USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
                           if user_agent_token else "")
    deadline = Deadline(timeout)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": agent})
        with _opener(deadline).open(request, timeout=timeout) as response:
            if disallowed_header_directives and i2d_downloader.is_disallowed(
                    response.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            advertised = response.headers.get("Content-Length", "")
            if advertised.isdigit() and int(advertised) > LIMITS["max_bytes"]:  # refused before reading it
                return key, None, f"too large: {int(advertised) >> 20} MB announced, more than {LIMITS['max_bytes'] >> 20} MB"
            body = io.BytesIO()
            while chunk := response.read1(_CHUNK):
                body.write(chunk)
                if body.tell() > LIMITS["max_bytes"]:
                    return key, None, f"too large: more than {LIMITS['max_bytes'] >> 20} MB"
                if deadline.expired:
                    break
            if deadline.expired:
                raise TimeoutError
        body.seek(0)
        area = _image_area(body)
        if area > LIMITS["max_image_area"]:  # img2dataset would decode it first, then refuse it
            return key, None, f"image area too large: {area:,} pixels (crawl.max_image_area), not decoded"
        return key, body, None
    except Exception as err:  # noqa: BLE001 — img2dataset's contract: the error as text, counted per reason
        if deadline.expired:
            return key, None, f"download timed out: not finished within crawl.timeout = {timeout} s"
        return key, None, str(err)
    finally:
        deadline.cancel()


class GuardedDownloader(i2d_downloader.Downloader):
    """img2dataset's Downloader; unpickled in a download process, it makes that process fetch through
    ``fetch`` with the crawl's limits."""

    def __init__(self, *args, limits: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __setstate__(self, state):
        self.__dict__.update(state)
        _install(state["limits"])


def _install(limits: dict) -> None:
    LIMITS.update(limits)
    i2d_downloader.download_image = fetch


@contextmanager
def guarded_downloads(schemes: tuple[str, ...], max_bytes: int, max_image_area: float = float("inf")):
    """``img2dataset.download()`` inside this block fetches through ``fetch``, in this process and in the
    processes it spawns."""
    limits = {"schemes": tuple(schemes), "max_bytes": max_bytes, "max_image_area": max_image_area}
    original = i2d_main.Downloader

    def make(*args, **kwargs):
        return GuardedDownloader(*args, limits=limits, **kwargs)

    i2d_main.Downloader = make
    _install(limits)
    try:
        yield
    finally:
        i2d_main.Downloader = original
        i2d_downloader.download_image = _ORIGINAL_DOWNLOAD_IMAGE
