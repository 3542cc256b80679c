"""regmw built-in plugin: gcs."""
