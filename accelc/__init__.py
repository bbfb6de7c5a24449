"""accelc: an inference-acceleration compiler for language models and neural networks."""

__version__ = "0.1.0"
