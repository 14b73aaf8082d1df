"""The front doors: the `mmaccel` command line, the demo, and the built-in tiny models."""
