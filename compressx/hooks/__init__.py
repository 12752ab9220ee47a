"""Runtime passes' hook machinery: forward hooks that change what a model computes without changing its weights."""
