"""Shared pytest configuration. Database fixtures live in the ``tests.pg`` plugin."""

pytest_plugins = ["tests.profiles", "tests.log_guard", "tests.pg", "tests.live"]
