"""Prefect tasks, one module per stage: thin wrappers that take paths and return paths + small dicts."""
