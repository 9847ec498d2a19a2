"""The ``sddpm`` command line: parses arguments and calls library functions, nothing more.

Each command lives in a module of its own here and registers itself on :data:`app`.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each registers its commands)
    energy,
    evaluate,
    export,
    models,
    moments,
    sample,
    train,
)
from ._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
