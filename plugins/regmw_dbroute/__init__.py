"""regmw built-in plugin: dbroute."""
