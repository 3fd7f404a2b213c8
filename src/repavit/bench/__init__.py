"""Benchmarks: throughput of vanilla, training-form and reparameterized models, measured side by side."""

from .throughput import count_gmacs, machine_info, run_benchmark, vanilla_counterpart

__all__ = ["count_gmacs", "machine_info", "run_benchmark", "vanilla_counterpart"]
