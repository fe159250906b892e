"""Stage 2: per-gene heads on cached embeddings (not yet implemented)."""
