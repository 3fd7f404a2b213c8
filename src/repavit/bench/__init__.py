"""Benchmarks: every form of a model timed side by side in one process (ratios, not absolute numbers)."""

from .suite import run_suite
from .throughput import (
    count_gmacs,
    count_params,
    interleaved_throughput,
    machine_info,
    peak_memory_mb,
    vanilla_counterpart,
)

__all__ = [
    "count_gmacs",
    "count_params",
    "interleaved_throughput",
    "machine_info",
    "peak_memory_mb",
    "run_suite",
    "vanilla_counterpart",
]
