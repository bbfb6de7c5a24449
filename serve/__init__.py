"""`accelc serve`: an OpenAI-compatible HTTP server over pinned worker processes that batch (docs/serving.md)."""
