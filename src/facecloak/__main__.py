"""``python -m facecloak``: the same as the ``facecloak`` command."""

from facecloak.cli import main

if __name__ == "__main__":
    main()
