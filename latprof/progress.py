"""Progress bars: tqdm with counts and ETA on stderr; silent when asked."""

from __future__ import annotations

import sys

# In a log file (nohup, CI) every redraw is a line: refresh at most this often there, so a long
# tuning run shows signs of life without burying the log. A terminal keeps tqdm's own rate.
LOG_INTERVAL_S = 30.0


def bar_factory(enabled: bool = True, stream=None):
    from tqdm import tqdm

    def make(**kwargs):
        out = sys.stderr if stream is None else stream  # looked up per bar: tests and CLIs swap sys.stderr
        interval = {} if _is_tty(out) else {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S}
        return tqdm(disable=not enabled, dynamic_ncols=True, leave=True, file=out, **{**interval, **kwargs})

    return make


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
