"""XLA flags of the test suite, shared by conftest.py and the tests that start CLI subprocesses."""

# Tests run tiny models for a few steps, so compiling dominates: XLA:CPU's backend optimisations
# at level 0 compile the tiny SimCLR step in 4.7 s instead of 12.6 s (measured 2026-12-06), and
# every numerical comparison of the suite is between two computations compiled alike or against a
# numpy reference. Benchmarks and real runs keep XLA's default level.
FAST_COMPILE = '--xla_backend_optimization_level=0'

# A CLI subprocess's XLA_FLAGS: one CPU device, as a user's laptop has, compiled as the suite is.
ONE_DEVICE = FAST_COMPILE
