"""`python -m detaudit`: the same command line as `detaudit`."""

from detaudit.cli import main

main()
