"""accelc.runtime: open an artifact and run it; backends in a registry. Never imports the compiler."""
