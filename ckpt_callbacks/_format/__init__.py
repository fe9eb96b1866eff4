"""The format: a tree of tensors <-> bytes and JSON, with no I/O (names, dtypes, chunks, kinds)."""
