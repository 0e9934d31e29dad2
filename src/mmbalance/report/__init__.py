"""Reports: one self-contained ``report.html`` per run or bench (figures embedded as PNG data
URIs, the PNGs also written beside it). Figures need the optional matplotlib; the statistics
(:mod:`mmbalance.report.stats`) need only the core dependencies."""
from .html import read_metrics, write_bench_report, write_report, write_run_report
from .stats import paired_comparison, t_interval

__all__ = ["write_run_report", "write_bench_report", "write_report", "read_metrics", "paired_comparison",
           "t_interval"]
