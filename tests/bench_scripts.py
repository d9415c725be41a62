"""The bench/ scripts as modules for the tests (bench/ is not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str, module_name: str | None = None) -> ModuleType:
    """bench/<name>.py as a fresh module, registered in sys.modules under module_name (default: name), where
    dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(module_name or name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
