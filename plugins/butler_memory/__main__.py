"""Entry point for ``python -m butler_memory``."""

from __future__ import annotations

import sys

from butler_memory.cli import main

if __name__ == "__main__":
    sys.exit(main())
