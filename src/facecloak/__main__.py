"""``python -m facecloak``: the same as the ``facecloak`` command."""

from facecloak.cli import command_line

if __name__ == "__main__":
    command_line()
