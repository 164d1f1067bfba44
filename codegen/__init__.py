"""Code-generation utilities for the Mini-Llama: evaluation metrics and helpers."""
