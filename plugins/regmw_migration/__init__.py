"""regmw built-in plugin: migration."""
