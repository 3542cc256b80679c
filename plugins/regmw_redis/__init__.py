"""regmw built-in plugin: redis."""
