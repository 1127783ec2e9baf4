"""Imports a repository script (benchmarks/*.py, scripts/*.py) as a module, for tests of its functions."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """load_script("benchmarks/train_bench.py") -> the module. It is registered in sys.modules under its
    stem first: dataclasses defined in it look their module up while the class is built."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
