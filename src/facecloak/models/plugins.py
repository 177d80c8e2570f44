"""Face models the user added with ``facecloak models add`` (filled in with the plug-in work)."""

from __future__ import annotations


def register_user_models() -> None:
    """Register the models the user added."""
