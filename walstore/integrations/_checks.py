"""Argument checks shared by the integrations."""
from __future__ import annotations

from typing import Any

from ..store import Store


def check_store(store: Any, who: str) -> None:
    """TypeError unless ``store`` is a walstore Store (``walstore.open``): SQLiteSession's second
    argument is a database path, and ``WalstoreSession("u", "state.db")`` raised "cannot
    create weak reference to 'str' object" (WalstoreStore("path") accepted it and raised
    AttributeError at its first call)."""
    if not isinstance(store, Store):
        hint = (" (pass walstore.open(path), not the path)"
                if isinstance(store, (str, bytes)) or hasattr(store, "__fspath__") else "")
        raise TypeError(f"{who} needs a walstore.Store, as walstore.open() returns, not "
                        f"{type(store).__name__}{hint}")
