"""Benchmarks of llmgine-celery (run from the repository root)."""
