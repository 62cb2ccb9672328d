"""Tools around the pipeline that are not a stage of it (the HTTP load generator)."""
