"""The front doors: the `mmaccel` command line, the demo, and the built-in tiny models."""

if __name__ != "mmaccel.apps":  # installed as mmaccel.apps; a second copy must never load
    raise ImportError("import mmaccel.apps, not the bare folder name 'apps'")
