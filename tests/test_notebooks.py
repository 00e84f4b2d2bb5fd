"""The notebooks in notebooks/ run top to bottom (nbclient, a real IPython kernel) and are
stored without outputs.

Each notebook's first code cell is `MODEL = None` (None = the embedded model). When the
embedded model is not in the package (a checkout before it was trained), the test rewrites
that line to a tiny random model with the embedded model's architecture
(`docs_model_folder`), so the notebooks still run end to end. With $SDJAX_NOTEBOOK_OUT set,
the executed notebooks (with outputs) are written there.
"""

import json
import os
import time
from pathlib import Path

import pytest

from sdjax.cli import EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["quickstart.ipynb", "sampler_math.ipynb", "finetune.ipynb"]
MODEL_LINE = "MODEL = None"
CELL_TIMEOUT_S = 900  # generous: CI runners are 2 slow cores; a cell compiles several programs
# The suite compiles with LLVM's optimisation off (conftest: compile-bound tests take half as
# long). finetune.ipynb's 40 LoRA steps are bound by execution instead, which that doubles: its
# kernel compiles at XLA's default level (38 -> 29 s; the other two notebooks were slower so).
AT_DEFAULT_LEVEL = {"finetune.ipynb"}


def docs_model_folder(folder: Path) -> Path:
    """The embedded model if shipped, else a random model of its architecture in `folder`.

    Random weights from `configs/tiny_model.json` and a tokenizer trained on the synthetic
    captions, as scripts/train_tiny.py starts (no reference folder, no torch). Written once.
    """
    if (EMBEDDED_MODEL / "model_index.json").exists():
        return EMBEDDED_MODEL
    if not (folder / "model_index.json").exists():
        from sdjax.data.tokenizer import train_tokenizer
        from sdjax.train.init import init_pipeline_folder

        spec = json.loads((ROOT / "configs" / "tiny_model.json").read_text())
        tmp = folder.with_name(folder.name + ".tmp")
        tokenizer = train_tokenizer(folder.with_name(folder.name + ".tokenizer"))
        init_pipeline_folder(tmp, spec, tokenizer, seed=0)
        tmp.rename(folder)
    return folder


def _read(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = _read(ROOT / "notebooks" / name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, name
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"{name} code cell {i} has outputs"
    assert code[0].source.splitlines()[0].startswith(MODEL_LINE), \
        f"{name}: the first code cell must start with {MODEL_LINE!r} (the test swaps the model there)"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return docs_model_folder(tmp_path_factory.mktemp("docs-model") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, model, tmp_path):
    from nbclient import NotebookClient

    nb = _read(ROOT / "notebooks" / name)
    first = next(c for c in nb.cells if c.cell_type == "code")
    if model != EMBEDDED_MODEL:
        first.source = first.source.replace(MODEL_LINE, f"MODEL = {str(model)!r}", 1)
    env_before = dict(os.environ)
    # The kernel inherits the environment: keep its JAX on the host CPU like the suite's.
    os.environ["JAX_PLATFORMS"] = "cpu"
    # ...and the suite's persistent compilation cache (JAX reads its config from JAX_* variables),
    # as the CLI subprocesses use it: programs other tests compiled are loaded, not recompiled.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SDJAX_CACHE_DIR"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    if name in AT_DEFAULT_LEVEL:
        from conftest import EXECUTION_XLA_FLAGS

        os.environ["XLA_FLAGS"] = EXECUTION_XLA_FLAGS
    try:
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        if os.environ.get("SDJAX_NOTEBOOK_OUT"):  # keep the executed notebook to look at
            import nbformat

            Path(os.environ["SDJAX_NOTEBOOK_OUT"]).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(os.environ["SDJAX_NOTEBOOK_OUT"]) / name)
    # Every code cell ran, and none wrote an error (nbclient raises on those too).
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None
            assert not [o for o in cell.outputs if o.output_type == "error"]
