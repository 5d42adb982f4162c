"""Rewrites of single operations that XLA:CPU compiles badly (see docs/performance.md)."""
