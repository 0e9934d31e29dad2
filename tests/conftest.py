import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    root = Path(os.environ.get("MMBALANCE_DATA", SHARED_DATA))
    if not (root / "fsdd" / "recordings").is_dir() or not (root / "mnist-subset").is_dir():
        pytest.skip(f"real data not found at {root} (expected fsdd/recordings and mnist-subset; set MMBALANCE_DATA)")
    return root
