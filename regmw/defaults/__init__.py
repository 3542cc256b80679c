"""Embedded defaults: every capability works in one process with no Redis and no cloud.

Each module is a pluggy plugin registered before anything else, so any enabled
plugin overrides it. Like datasette's default plugins, they are also the
reference implementations of their hooks.
"""
