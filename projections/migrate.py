"""Entry point of schema migration (`tierflow up`, every process that connects): see projections.schema."""

from __future__ import annotations

from tierflow.projections.schema import migrate, migrate_conn

__all__ = ["migrate", "migrate_conn"]
