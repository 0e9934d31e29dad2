"""Built-in datasets: importing this package imports every module in it, which registers them
(a new dataset = a new module here, nothing else edited)."""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
