"""Progress bars: in a log file they redraw rarely (a tuned run is silent for half an hour otherwise,
or buries its log in redraws); on a terminal they keep tqdm's rate; disabled, they write nothing."""

import io

from latprof.progress import LOG_INTERVAL_S, bar_factory


class Tty(io.StringIO):
    def isatty(self):
        return True


def _run(stream, enabled=True):
    bar = bar_factory(enabled, stream=stream)(total=1000, desc="tune")
    for _ in range(1000):
        bar.update(1)
    bar.close()
    return bar


def test_log_file_bar_shows_start_and_end_but_few_redraws():
    log = io.StringIO()
    bar = _run(log)
    assert bar.mininterval == LOG_INTERVAL_S
    frames = [f for f in log.getvalue().split("\r") if "tune" in f]
    assert "0/1000" in frames[0] and "1000/1000" in frames[-1]  # a sign of life at once, and the end
    assert len(frames) <= 3  # 1000 quick updates: no redraw between start and end


def test_terminal_bar_keeps_tqdm_rate():
    bar = _run(Tty())
    assert bar.mininterval < 1


def test_disabled_bar_writes_nothing():
    log = io.StringIO()
    _run(log, enabled=False)
    assert log.getvalue() == ""
