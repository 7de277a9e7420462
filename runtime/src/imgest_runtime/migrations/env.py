"""Alembic environment shared by every service: the service passes its URL and metadata."""

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
metadata = config.attributes["metadata"]
schema = metadata.schema


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema,
        include_schemas=True,
        include_name=lambda name, type_, _parent: type_ != "schema" or name == schema,
    )
    with context.begin_transaction():
        context.run_migrations()


async def main() -> None:
    engine = create_async_engine(config.attributes["url"])
    async with engine.connect() as connection:
        # Services may start together: serialise their migrations on one advisory lock.
        await connection.execute(text("select pg_advisory_lock(4242)"))
        await connection.execute(text(f'create schema if not exists "{schema}"'))
        await connection.commit()
        await connection.run_sync(run)
        await connection.commit()
        await connection.execute(text("select pg_advisory_unlock(4242)"))
    await engine.dispose()


asyncio.run(main())
