"""One-shot functions over checkpoints by URL: resolve, load, copy, delete."""
