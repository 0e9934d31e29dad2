from .evaluate import evaluate
from .metrics import accuracy, confusion_matrix, macro_f1

__all__ = ["evaluate", "accuracy", "confusion_matrix", "macro_f1"]
