"""accelc.passes: model transformations, one module per pass (see accelc.compiler.registry)."""
