"""accelc.loops: generation loops, one module each, written once against a runtime protocol."""
