"""Alembic revisions: one per schema change."""
