"""The manager and its policies: naming, the state file, retention, the lock, the worker, the commit."""
