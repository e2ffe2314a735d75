"""Progress bars a log file can hold: tqdm on a terminal, elsewhere a plain log line every few seconds.

A tqdm bar written to a file is a stream of carriage returns (runs logged 0.1–1 MB of them). When
stderr is not a terminal, ``progress`` gives the same tqdm object (same arguments, ``update``,
``set_postfix``) whose output is instead one ``logging`` line at most every ``LOG_EVERY`` seconds,
and one when it closes.
"""

import io
import logging
import sys
import time

from tqdm import tqdm

LOG_EVERY = 15.0  # seconds between two progress lines in a log
log = logging.getLogger("webdistill.progress")


class LoggedProgress(tqdm):
    """tqdm that reports through ``logging`` instead of redrawing a bar."""

    def __init__(self, *args, **kwargs):
        kwargs.update(file=io.StringIO(), mininterval=max(kwargs.get("mininterval", 0), LOG_EVERY), ascii=True,
                      bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, "
                                 "{rate_fmt}{postfix}]")
        self._last_logged, self._closing = time.monotonic(), False
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        # tqdm also redraws on set_postfix and refresh: the clock decides here, except for the last line
        due = self._closing or time.monotonic() - self._last_logged >= LOG_EVERY
        if self.n and msg != "" and due:  # not the empty bar at the start, nor the erasing of a bar
            log.info("%s", self.__str__())
            self._last_logged = time.monotonic()
        return True

    def close(self):
        self._closing = True
        super().close()


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; a ``LoggedProgress`` otherwise."""
    if kwargs.get("disable") or sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return LoggedProgress(iterable, **kwargs)
