"""The ``detaudit`` console script and ``python -m detaudit.cli``: the command line
lives in ``detaudit.commands``; this name stays for scripts and tests that use it."""

from detaudit.commands import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
