"""Every error class sdjax raises lives in `sdjax.errors`, and the places that defined them
before still export them (`from sdjax.pipeline.inpaint import TaskError` works)."""

import ast
import importlib
from pathlib import Path

import pytest

from sdjax import errors

PACKAGE = Path(errors.__file__).parent

# Old import paths, kept by re-export.
OLD_PATHS = [("sdjax.cli", "UsageError"), ("sdjax.cli_networks", "NetworkUsageError"),
             ("sdjax.pipeline.inpaint", "TaskError"), ("sdjax.prompts.emphasis", "PromptError"),
             ("sdjax.prompts", "PromptError"), ("sdjax.sampling.names", "UnknownNameError"),
             ("sdjax.sampling", "UnknownNameError"), ("sdjax.images", "ImageError"),
             ("sdjax.metadata", "InfotextError"), ("sdjax.pipeline.batch", "BatchError"),
             ("sdjax.data.datasets", "DatasetError"), ("sdjax.data", "DatasetError")]


def _exception_classes_outside_errors():
    """(file, class) for each class deriving from an *Error / *Exception outside errors.py.
    Module-private classes (`_Reject`: control flow inside one module, never raised out of it)
    are not errors sdjax raises and may stay where they are used."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                if node.name.startswith("_"):
                    continue
                if any(b.split(".")[-1].endswith(("Error", "Exception")) for b in bases):
                    found.append((str(path.relative_to(PACKAGE)), node.name))
    return found


def test_error_classes_are_defined_only_in_errors_py():
    assert _exception_classes_outside_errors() == []


@pytest.mark.parametrize("module, name", OLD_PATHS)
def test_old_import_paths_still_work(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_every_error_is_a_user_facing_sdjax_error():
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) == 19
    assert all(issubclass(c, errors.SdjaxError) for c in classes)
