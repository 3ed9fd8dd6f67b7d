"""Sites by name: the name each SuperNode was registered under (``flwr supernode register
... --name north``), read from the SuperLink's state database.

Flower 1.41 keeps that name in its SQLite database (table ``node``, column ``name``) but gives
the ServerApp no API to read it. ``biofp server start`` names the database in the environment of
the SuperLink (``BIOFP_SUPERLINK_DATABASE``), which its ServerApps inherit; the ServerApp opens it
read-only. Without it (a simulation, an unnamed registration, another Flower version) a site is
``node-<id>``, as before.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE_ENV = "BIOFP_SUPERLINK_DATABASE"  # = biofp_cli.superlink.SUPERLINK_DATABASE_ENV
_UINT64 = (1 << 64) - 1


def node_label(node_id: int, names: dict[int, str]) -> str:
    """A site as the coordinator reads it: its registration name, else ``node-<id>``."""
    return names.get(node_id) or f"node-{node_id}"


def registered_names(database: Path | None = None) -> dict[int, str]:
    """Node id -> registration name of every named SuperNode; {} when unknown.

    Parameters
    ----------
    database
        The SuperLink's state database; default: ``$BIOFP_SUPERLINK_DATABASE``.
    """
    if database is None:
        env = os.environ.get(DATABASE_ENV)
        if not env:
            return {}
        database = Path(env)
    if not Path(database).is_file():
        return {}
    try:
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
        try:
            rows: Iterable[tuple[int, str]] = conn.execute(
                "SELECT node_id, name FROM node WHERE name IS NOT NULL AND node_id IS NOT NULL"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.warning("site names unavailable (%s): %s", database, exc)
        return {}
    return {int(node_id) & _UINT64: str(name) for node_id, name in rows if str(name).strip()}
