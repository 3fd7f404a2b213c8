"""Benchmarks: every form of a model timed side by side in one process (ratios, not absolute numbers)."""

from ..measure import count_gmacs, count_params, interleaved_throughput, machine_info, peak_memory_mb
from .suite import run_suite, vanilla_counterpart

__all__ = [
    "count_gmacs",
    "count_params",
    "interleaved_throughput",
    "machine_info",
    "peak_memory_mb",
    "run_suite",
    "vanilla_counterpart",
]
