from memory.fact import fact_memory  # noqa: F401  (the session fixture, shared with other test folders)
