"""KV-cache storage and the attention that reads it."""
