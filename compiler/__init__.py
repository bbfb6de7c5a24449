"""accelc.compiler: recipe -> passes -> targets -> a proven artifact (docs/architecture.md)."""
