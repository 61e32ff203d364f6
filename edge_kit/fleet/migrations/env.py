"""Alembic's entry point: runs the migrations on the connection `edge_kit.fleet.migrations.upgrade` passes."""

from alembic import context

from edge_kit.fleet.migrations import VERSION_TABLE

context.configure(connection=context.config.attributes["connection"], version_table=VERSION_TABLE,
                  transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
