"""A plugin whose import fails: the manager must report it by name and load the others."""

raise ImportError("libfoo.so.1: cannot open shared object file")
