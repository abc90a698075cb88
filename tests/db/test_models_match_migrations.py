"""The models and the migrations describe one schema: what autogenerate would write next is nothing."""

from __future__ import annotations

import os

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from backend.db.models import metadata

pytestmark = pytest.mark.integration


async def test_the_migrated_schema_is_what_the_models_declare(app):
    engine = create_async_engine(os.environ["DATABASE_OWNER_URL"])
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}), metadata)
            )
    finally:
        await engine.dispose()
    assert differences == [], "\n".join(str(d) for d in differences)
