"""Fakes shipped with pdx for tests and benchmarks: engines that speak the real protocols."""
