"""Diagnostics: is each modality used? (``mmbalance diagnose RUN_DIR``; see :mod:`.diagnose`)."""
from .diagnose import diagnose, diagnose_run, reference_accuracies
from .probes import USED_DROP_POINTS

__all__ = ["diagnose", "diagnose_run", "reference_accuracies", "USED_DROP_POINTS"]
