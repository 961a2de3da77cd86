"""Puzzle: distillation-based NAS for inference-optimized LLMs."""

__version__ = "0.1.0"
