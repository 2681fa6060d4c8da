"""Progress bars: tqdm with counts and ETA on stderr; silent when asked."""

from __future__ import annotations


def bar_factory(enabled: bool = True):
    from tqdm import tqdm

    def make(**kwargs):
        return tqdm(disable=not enabled, dynamic_ncols=True, leave=True, **kwargs)

    return make
