"""``python -m cachefs``: the command line."""

from cachefs.cli import main

if __name__ == "__main__":
    main()
