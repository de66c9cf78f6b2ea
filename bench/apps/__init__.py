"""Applications the benchmark's worker subprocesses import."""
