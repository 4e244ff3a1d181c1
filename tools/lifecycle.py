"""What every server and sampler in tools/ shares: start(), stop(), and a ``with`` block over both.

Standard library only: tools/fake_openai.py also runs as a script of its own.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Running:
    """Entering a ``with`` block starts the thing (and returns it), leaving it stops it."""

    def start(self) -> Self:
        """Start and return it."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        """Start and return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        self.stop()
