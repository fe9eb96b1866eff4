"""What the framework callbacks share: the save trigger, the checked configuration, RNG state."""
