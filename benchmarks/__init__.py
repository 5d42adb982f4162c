"""Throughput benchmarks (run as scripts; see docs/performance.md)."""
