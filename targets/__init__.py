"""accelc.targets: lowerings to deployment targets, one module per target kind."""
