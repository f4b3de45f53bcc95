"""detaudit: does an LLM give the same answer twice? Measure it, and show the fix."""

__version__ = "0.1.0"
