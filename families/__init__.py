"""accelc.families: one module per model family (ingest, export, prove, runtime protocol)."""
