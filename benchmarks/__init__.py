"""Benchmarks, and the proof apparatus they share with its tests (``synthetic``, ``teacher_training``):
code the benchmarks run, not what users run, so it lives outside the package."""
