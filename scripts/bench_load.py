"""How long does sdjax take to load a UNet, against plainly reading its safetensors file?

    python scripts/bench_load.py                 # SD 1.5-size random UNet in a temp dir (3.4 GB)
    python scripts/bench_load.py /data/unet      # reuse (or create) a folder: config.json + weights
    python scripts/bench_load.py --quick         # tiny config, for tests

The file is written without torch: tensor names and shapes come from sdjax's own
abstract UNet (`abstract_model`: shapes only), values are random. Both timings run on a warm
page cache (the file is read once before timing), so the ratio measures
sdjax's conversion overhead (transposes, casts, device placement), not the disk.
Target: ratio under 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sdjax import runtime

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_UNET = dict(SD15_UNET, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
WEIGHTS = "diffusion_pytorch_model.safetensors"


def torch_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Torch name -> torch-layout shape of every UNet parameter, from the abstract sdjax model."""
    from sdjax.models.unet import UNet2DConditionModel, UNetConfig
    from sdjax.weights.diffusers import abstract_model
    from sdjax.weights.mapping import to_torch_layout, torch_name

    cfg = UNetConfig.from_dict(config)
    abstract = abstract_model(UNet2DConditionModel, cfg)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        shape = var.get_value().shape
        out[torch_name(path)] = to_torch_layout(path[-1], np.empty(shape, np.bool_)).shape
    return out


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """Stream random float32 tensors into a safetensors file (one tensor in memory at a time)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for shape in shapes.values():
            f.write((0.02 * rng.standard_normal(shape, np.float32)).tobytes())
    return offset


def ensure_unet_folder(folder: Path, config: dict) -> Path:
    if (folder / WEIGHTS).is_file() and (folder / "config.json").is_file():
        print(f"reusing {folder / WEIGHTS}", flush=True)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    t = time.perf_counter()
    n = write_random_safetensors(folder / WEIGHTS, torch_shapes(config))
    print(f"wrote {folder / WEIGHTS}: {n / 1e9:.2f} GB in {time.perf_counter() - t:.1f}s", flush=True)
    return folder


def time_plain_read(path: Path) -> float:
    from safetensors.numpy import load_file

    t = time.perf_counter()
    arrays = load_file(str(path))
    dt = time.perf_counter() - t
    del arrays
    return dt


def time_sdjax_load(folder: Path, dtype: str) -> float:
    from sdjax.weights.diffusers import load_model

    t = time.perf_counter()
    model, _ = load_model("unet", folder, dtype=dtype)
    jax.block_until_ready(nnx.state(model))
    dt = time.perf_counter() - t
    del model
    return dt


def time_abstract_build(folder: Path, dtype: str) -> float:
    """The part of the load that does not depend on the file: building the abstract model."""
    from sdjax.models.unet import UNet2DConditionModel
    from sdjax.weights.diffusers import abstract_model, read_config

    config = read_config("unet", folder)
    t = time.perf_counter()
    abstract_model(UNet2DConditionModel, config, dtype)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", help="UNet folder to reuse or create (default: a temp dir, deleted)")
    ap.add_argument("--quick", action="store_true", help="tiny UNet config (seconds; for tests)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    args = ap.parse_args(argv)
    runtime.configure()  # process-wide XLA settings, before JAX starts
    config = TINY_UNET if args.quick else SD15_UNET

    tmp = None
    if args.folder:
        folder = Path(args.folder)
    else:
        tmp = tempfile.mkdtemp(prefix="sdjax_bench_")
        folder = Path(tmp) / "unet"
    try:
        ensure_unet_folder(folder, config)
        path = folder / WEIGHTS
        path.read_bytes()  # warm the page cache for both contenders
        time_sdjax_load(folder, args.dtype)  # first call pays for imports and tracing
        plain = min(time_plain_read(path) for _ in range(args.repeats))
        ours = min(time_sdjax_load(folder, args.dtype) for _ in range(args.repeats))
        build = min(time_abstract_build(folder, args.dtype) for _ in range(args.repeats))
        size = path.stat().st_size / 1e9
        print(f"file: {size:.3f} GB on {jax.devices()[0].platform}, dtype {args.dtype}", flush=True)
        print(f"plain read (safetensors.numpy.load_file): {plain:.3f}s", flush=True)
        print(f"sdjax load (abstract model + load_state):  {ours:.3f}s "
              f"(of which {build:.3f}s builds the abstract model)", flush=True)
        print(f"ratio: {ours / plain:.2f}x (target < 2x)", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
