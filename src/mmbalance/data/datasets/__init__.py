"""Built-in datasets (importing this package registers them)."""
from . import avdigits, npz, synthetic  # noqa: F401
