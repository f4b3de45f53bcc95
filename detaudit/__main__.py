"""`python -m detaudit`: the same command line as `detaudit`."""

from detaudit.commands import main

main()
