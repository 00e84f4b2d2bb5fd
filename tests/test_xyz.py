"""X/Y/Z plot: A1111's axis names and range syntax, batching cells into few calls, the labelled grid
(its size, labels and metadata), each cell equal to the same single generation, and the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli_main
import sdjax
from sdjax.errors import UsageError
from sdjax.images import read_infotext, read_xmp
from sdjax.metadata import parse_infotext
from sdjax.pipeline import xyz

EMBEDDED = Path(sdjax.__file__).resolve().parent / "assets" / "tiny"


@pytest.mark.parametrize("spec,label,values", [
    ("Seed: 1-5", "Seed", [1, 2, 3, 4, 5]),
    ("seed: 1-5 (+2)", "Seed", [1, 3, 5]),
    ("SEED: 10-1 (-3), 42", "Seed", [10, 7, 4, 42]),  # A1111: range(10, 1 + 1, -3)
    ("Steps: 1-10 [5]", "Steps", [1, 3, 5, 7, 10]),
    ("CFG scale: 4-10 (+3)", "CFG Scale", [4.0, 7.0, 10.0]),
    ("cfg Scale: 4-10 [4]", "CFG Scale", [4.0, 6.0, 8.0, 10.0]),
    ("CFG Scale: 4, 7.5, 10", "CFG Scale", [4.0, 7.5, 10.0]),
    ("Sampler: Euler a, DPM++ 2M Karras", "Sampler", ["Euler a", "DPM++ 2M Karras"]),
    ('Prompt S/R: cat, "dog, big"', "Prompt S/R", ["cat", "dog, big"]),
    ("scheduler: Karras, Exponential", "Schedule type", ["Karras", "Exponential"]),
    ("Denoising: 0.25-0.75 (+0.25)", "Denoising", [0.25, 0.5, 0.75]),
])
def test_axis_names_and_a1111_ranges(spec, label, values):
    axis, got = xyz.parse_axis(spec)
    assert axis.label == label
    assert got == pytest.approx(values) and all(type(v) is type(values[0]) for v in got)


def test_axis_errors_and_prompt_sr():
    with pytest.raises(UsageError, match="unknown axis"):
        xyz.parse_axis("Flavour: 1, 2")
    with pytest.raises(UsageError, match="not a int"):
        xyz.parse_axis("Steps: ten")
    with pytest.raises(UsageError, match="LABEL"):
        xyz.parse_axis("Steps 10")
    cells = xyz.plan({"prompt": "a cat on a mat", "negative_prompt": "ugly cat"},
                     [xyz.parse_axis("Prompt S/R: cat, dog")])
    assert [c.options["prompt"] for c in cells] == ["a cat on a mat", "a dog on a mat"]
    assert cells[1].options["negative_prompt"] == "ugly dog"
    with pytest.raises(UsageError, match="did not find"):
        xyz.plan({"prompt": "a bird"}, [xyz.parse_axis("Prompt S/R: cat, dog")])


def test_cells_group_into_one_call_per_sampler_and_steps():
    axes = [xyz.parse_axis(s) for s in ("Sampler: Euler a, DPM++ 2M Karras", "CFG Scale: 4, 7, 10", "Steps: 10, 20")]
    cells = xyz.plan({"prompt": "x", "seed": 3}, axes)
    assert len(cells) == 12 and (cells[1].x, cells[1].y, cells[1].z) == (1, 0, 0)
    groups = xyz.group_cells(cells)
    assert len(groups) == 4  # 2 samplers x 2 step counts; the CFG values ride in one batch
    for g in groups:
        assert len({(c.options["sampler"], c.options["steps"]) for c in g}) == 1
        options = xyz.batch_options(g)
        assert options["batch_size"] == 3 and options["cfg_scale"] == [4.0, 7.0, 10.0] and options["seeds"] == [3] * 3


def test_request_takes_per_image_seeds_and_cfg_scales():
    from sdjax.errors import RequestError, TaskError
    from sdjax.pipeline.request import Request

    r = Request(["a", "b"], seed=7, seeds=[7, 3], cfg_scale=[4.0, 9.5])
    assert r.batch_size == 2 and r.seeds == [7, 3]
    with pytest.raises(TaskError, match="3 per-image values but the batch has 2"):
        Request(["a", "b"], cfg_scale=[1.0, 2.0, 3.0])
    with pytest.raises(RequestError, match="seeds has 3 entries"):
        Request(["a", "b"], seeds=[1, 2, 3])
    with pytest.raises(RequestError, match="cfg_scale must be a finite number"):
        Request("a", batch_size=2, cfg_scale=[1.0, float("nan")])
    with pytest.raises(RequestError, match="seed"):
        Request("a", batch_size=2, seeds=[1, -4])


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load_pipeline(EMBEDDED)


def test_grid_labels_metadata_and_cells_equal_single_generations(pipe):
    base = dict(prompt="a red circle", negative_prompt="", steps=2, width=64, height=64, seed=0,
                sampler="Euler", schedule="Karras")
    calls = []

    def generate(**kw):
        calls.append(kw)
        return pipe.generate(**kw)

    specs = ["CFG Scale: 3, 8", "Seed: 5-6", "Negative prompt: green, blue"]
    result = xyz.run(generate, base, specs, max_batch=4)
    assert len(result.cells) == 8 and result.calls == len(calls) == 2  # batches of 4, one compiled function
    assert len(result.grids) == 2
    for iz, (grid, layout, info) in enumerate(result.grids):
        assert (layout.cols, layout.rows) == (2, 2) and layout.left > 0 and layout.top > 0
        assert grid.size == (layout.left + 2 * 64, layout.top + 2 * 64)
        ink = np.asarray(grid.convert("L")) < 128
        for c in range(2):  # a column label above each column, a row label left of each row
            x0, y0, x1, _ = layout.cell_box(0, c)
            assert ink[:layout.top, x0:x1].any()
            assert not ink[:layout.top, :layout.left].any()  # the corner stays blank
        for r in range(2):
            _, y0, _, y1 = layout.cell_box(r, 0)
            assert ink[y0:y1, :layout.left].any()
        params = parse_infotext(info)
        assert params["X Type"] == "CFG Scale" and params["X Values"] == "3, 8"
        assert params["Y Type"] == "Seed" and params["Y Values"] == "5-6"
        assert params["Z Type"] == "Negative prompt" and params["Z Values"] == "green, blue"
        assert params["Negative prompt"] == ["green", "blue"][iz] and params["Seed"] == "5"
        assert params["CFG scale"] == "3.0"
        assert ink[:layout.top - 20, layout.left:].any()  # the Z title line
        for r in range(2):
            for c in range(2):
                i = (iz * 2 + r) * 2 + c
                crop = np.asarray(grid.crop(layout.cell_box(r, c)))
                assert np.array_equal(crop, np.asarray(result.images[i]))
    for cell, image, info in zip(result.cells, result.images, result.infotexts):
        alone = pipe.generate(**cell.options)
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(alone.images[0], np.int16))
        assert diff.max() <= 1  # fp32 batch-size rounding, as tests/test_generate.py allows
        assert info == alone.infotexts[0]


@pytest.mark.slow  # a CLI run in a subprocess
def test_cli_writes_cells_and_grid(tmp_path, capsys):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SDJAX_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "a cat", "--steps", "2", "--width", "64",
                        "--height", "64", "--seed", "1", "--no-watermark", "--out", str(out),
                        "--xyz", "cfg scale: 4, 7", "Seed: 1-3"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    written = [Path(p) for p in r.stdout.split()]
    assert len(written) == 7 and all(p.exists() for p in written)
    grid = written[-1]
    assert grid.name == "grid-z0.png" and grid.parent.name.startswith("xyz-")
    params = parse_infotext(read_infotext(grid))
    assert params["X Values"] == "4, 7" and params["Y Values"] == "1-3"
    assert read_xmp(grid) is not None
    cell = Image.open(grid.parent / "cell-z0-y2-x1.png")
    assert "Seed: 3" in read_infotext(grid.parent / "cell-z0-y2-x1.png")
    assert Image.open(grid).width > 2 * cell.width and Image.open(grid).height > 3 * cell.height
    status, err = cli_main(capsys, "generate", "a cat", "--out", tmp_path / "a.png", "--xyz", "Seed: 1, 2")
    assert status == 2 and "--xyz" in err
