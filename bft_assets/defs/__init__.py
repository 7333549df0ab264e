"""The repository's own dg defs folder: the demo instance, declared in YAML."""
