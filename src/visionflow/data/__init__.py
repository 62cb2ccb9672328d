"""Data: ingest a source into data/raw, version it with DVC, validate it, split it, and cache decoded images."""
