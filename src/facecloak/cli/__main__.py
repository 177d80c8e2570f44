"""``python -m facecloak.cli``: the same as the ``facecloak`` command (``python -m facecloak`` too)."""

from facecloak.cli import main

main()
