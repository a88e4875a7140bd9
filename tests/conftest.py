"""Shared pytest configuration. Database fixtures live in the ``tests.pg`` plugin."""
