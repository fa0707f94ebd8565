"""Progress reporting as a plug-in: library code takes a `progress` callable and never prints itself."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")
Progress = Callable[..., Iterable]


def no_progress(iterable: Iterable[T], label: str = "", length: Optional[int] = None) -> Iterable[T]:
    return iterable


def click_progress(iterable: Iterable[T], label: str = "", length: Optional[int] = None) -> Iterable[T]:
    """A click progress bar on stderr; used by the CLIs."""
    import sys

    import click

    with click.progressbar(iterable, label=label, length=length, file=sys.stderr,
                           show_pos=True, show_eta=True) as bar:
        yield from bar
