"""``python -m cachefs``: the command line."""

from cachefs.cli import main

main()
