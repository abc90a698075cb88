"""Run Alembic migrations programmatically (the `contactcenter migrate` command)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(owner_url: str | None = None) -> Config:
    """Alembic's configuration pointing at our migrations, optionally at a given owner DSN."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("file_template", "%%(year)d-%%(month).2d-%%(day).2d_%%(slug)s_%%(rev)s")
    if owner_url:
        config.set_main_option("sqlalchemy.url", owner_url)
    return config


def upgrade(owner_url: str | None = None, revision: str = "head") -> None:
    """Bring the schema to `revision` as the schema owner."""
    command.upgrade(alembic_config(owner_url), revision)
