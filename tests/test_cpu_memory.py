"""bf16 weights on CPU: sampling holds no float32 copy of the whole UNet.

XLA:CPU computes bf16 matmuls and convs on float32 copies of the weights. Its default
scheduler makes all of a step's copies at once; `sdjax.runtime.configure()` (called by the
entry points, and by conftest for the suite) selects the memory-minimising one (XLA_FLAGS),
which frees each after its layer. Without it bf16 SD 1.5 at 512x512 needed
3.44 GiB of temporaries (a float32 UNet) instead of 0.56 GiB.
"""

import os
import sys
from pathlib import Path

import jax
import numpy as np

from sdjax import runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the benchmark lives in scripts/bench/
from bench import parts as bench_parts  # noqa: E402

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def test_configure_selects_the_memory_minimising_cpu_scheduler():
    # conftest called runtime.configure() before JAX started, as every entry point does.
    assert f"--{runtime.SCHEDULER_FLAG}=false" == FLAG
    assert FLAG in os.environ["XLA_FLAGS"].split()


def test_bf16_sampling_keeps_no_float32_copy_of_the_unet():
    configs = bench_parts.reference_configs(bench_parts.default_reference(), tiny=True)
    # Wide enough for XLA's large-matmul path (which converts bf16 weights to float32);
    # 64x64 pixels keep the activations small next to the weights.
    configs["unet"].update(block_out_channels=[256, 512], norm_num_groups=32, attention_head_dim=8)
    models = bench_parts.sdjax_random(configs, dtype="bfloat16")
    gen = bench_parts.Txt2Img(bench_parts.sdjax_pipeline(models, configs, None, "bfloat16"), guidance=5.0)
    compiled = gen.compile(gen.inputs(["a"], 64, 4, [0]))
    unet_f32_bytes = sum(int(np.prod(a.shape)) * 4 for a in jax.tree.leaves(models["unet"]))
    temp = compiled.memory_analysis().temp_size_in_bytes
    # Measured: 21 MB with the flag, 201 MB (more than the 199 MB float32 UNet) without.
    assert temp < 0.5 * unet_f32_bytes, (temp, unet_f32_bytes)
