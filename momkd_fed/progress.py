"""Progress bars (rich) shown only when stderr is a terminal; elsewhere a silent no-op."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)``, which moves a bar of ``total`` steps; does nothing off a TTY or when disabled.

    Parameters
    ----------
    total : int
        Number of steps (slides).
    description : str
        Label shown left of the bar.
    enabled : bool
        ``train.progress``; False always gives the no-op.
    """
    if not (enabled and _is_tty()):
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
