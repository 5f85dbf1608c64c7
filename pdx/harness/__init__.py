"""Run real engines as child processes for tests, benchmarks and ``pdx launch``."""
