"""worldhost: a plugin-based world server on Trio."""

__version__ = "0.1.0"
