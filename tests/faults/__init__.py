"""The fault corpus: bad input and machine faults, each ending in a clear error and nothing lost."""
