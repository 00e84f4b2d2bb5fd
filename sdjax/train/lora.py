"""LoRA training math: which kernels are adapted, the low-rank factors, the merged weights,
and the kohya-format file that A1111, ComfyUI and diffusers load.

A LoRA on a kernel W replaces it with `W + (alpha / rank) * down @ up` (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models"). Factors are kept in the JAX
kernel layout so the update is one contraction over the rank:

    Linear kernel (in, out):          down (in, r),          up (r, out)
    Conv kernel (kh, kw, in, out):    down (kh, kw, in, r),  up (r, out)   (LoCon: k x k down, 1x1 up)

Only the factors are trained; `apply` builds the effective weights from (frozen base
state, factors) inside the jitted step, so gradients reach the factors through it and
the base weights never enter the optimizer. Initialisation follows kohya / PEFT:
`down` ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with a = sqrt(5)), `up` = 0,
so the first step starts from the base model exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.weights.lora import module_index
from sdjax.weights.mapping import to_torch_layout

# Module-name suffixes (dotted, as in diffusers / transformers). A target applies to the UNet
# unless prefixed with "text_encoder:". Group names expand to several suffixes.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
TE_ATTENTION = ("text_encoder:q_proj", "text_encoder:k_proj", "text_encoder:v_proj", "text_encoder:out_proj")
TE_MLP = ("text_encoder:fc1", "text_encoder:fc2")
GROUPS = {"attn": UNET_ATTENTION, "ff": UNET_FEED_FORWARD,
          "text_encoder:attn": TE_ATTENTION, "text_encoder:mlp": TE_MLP}
DEFAULT_TARGETS = UNET_ATTENTION
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def parse_targets(targets: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """`lora_targets` -> {"unet": suffixes, "text_encoder": suffixes} (groups expanded)."""
    out: dict[str, list[str]] = {"unet": [], "text_encoder": []}
    for t in targets:
        for name in GROUPS.get(t, (t,)):
            component, _, suffix = name.rpartition(":")
            component = component or "unet"
            if component not in out or not suffix:
                raise ConfigError(f"lora_targets entry {t!r}: use a module-name suffix such as 'to_q' (UNet) or "
                                  f"'text_encoder:q_proj', or a group {sorted(GROUPS)}")
            if suffix not in out[component]:
                out[component].append(suffix)
    return {k: tuple(v) for k, v in out.items() if v}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The static part of a LoRA run: rank, alpha and, per component, the adapted kernels
    as {kohya module key (`_` form, no prefix): state path of the kernel}."""

    rank: int
    alpha: float
    modules: Mapping[str, Mapping[str, tuple]]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def make_spec(states: Mapping[str, nnx.State], targets: tuple[str, ...], rank: int,
              alpha: float | None = None) -> LoRASpec:
    """Find the kernels named by `targets` in `states` ({"unet": State, "text_encoder": State}).

    Module keys are the names `sdjax.weights.lora` reads back (kohya `_` form; text-encoder
    keys with the transformers v4 `text_model_` prefix that real files carry). A target that
    matches no module raises ConfigError.
    """
    modules: dict[str, dict[str, tuple]] = {}
    for component, suffixes in parse_targets(targets).items():
        # module_index: name -> kernel path; invert it, keeping the names kohya files use.
        index = module_index(states[component], component)
        key_of = {path: key for key, path in index.items()
                  if component != "text_encoder" or key.startswith("text_model_")}
        found: dict[str, tuple] = {}
        for suffix in suffixes:
            hits = {key_of[p]: p for p in key_of
                    if ".".join(str(x) for x in p[:-1]).endswith("." + suffix)
                    or ".".join(str(x) for x in p[:-1]) == suffix}
            if not hits:
                raise ConfigError(f"lora_targets: no {component} module ends with {suffix!r}")
            found.update(hits)
        modules[component] = dict(sorted(found.items()))
    return LoRASpec(rank=rank, alpha=float(rank if alpha is None else alpha), modules=modules)


def init_params(spec: LoRASpec, states: Mapping[str, nnx.State], key: jax.Array) -> dict:
    """Fresh factors {component: {module key: {"down", "up"}}}, float32; `up` = 0."""
    params: dict = {}
    for component, modules in spec.modules.items():
        flat = dict(nnx.to_flat_state(states[component]))
        params[component] = {}
        for i, (name, path) in enumerate(modules.items()):
            kernel_shape = flat[path].get_value().shape
            *fan, out = kernel_shape
            bound = 1.0 / np.sqrt(float(np.prod(fan)))
            k = jax.random.fold_in(key, i + (0 if component == "unet" else 100_000))
            params[component][name] = {
                "down": jax.random.uniform(k, (*fan, spec.rank), jnp.float32, -bound, bound),
                "up": jnp.zeros((spec.rank, out), jnp.float32),
            }
    return params


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """`down @ up` contracted over the rank: (..., in, r) x (r, out) -> (..., in, out)."""
    return jnp.tensordot(down, up, axes=1)


def apply(spec: LoRASpec, component: str, base: nnx.State, params: Mapping[str, Mapping[str, jax.Array]]
          ) -> nnx.State:
    """The effective state `W + scale * down @ up` for the adapted kernels of `component`.

    Pure and traceable (used inside the jitted step); the sum is done in float32 and cast
    to W's dtype. Other leaves are passed through unchanged.
    """
    by_path = {path: params[name] for name, path in spec.modules[component].items()}
    out = []
    for path, var in nnx.to_flat_state(base):
        if path in by_path:
            w = var.get_value()
            d = delta(by_path[path]["down"], by_path[path]["up"])
            var = var.replace((w.astype(jnp.float32) + spec.scale * d).astype(w.dtype))
        out.append((path, var))
    return nnx.from_flat_state(out)


def merged_states(spec: LoRASpec, base: Mapping[str, nnx.State], params: Mapping) -> dict[str, nnx.State]:
    """{component: effective state} for every adapted component."""
    return {c: apply(spec, c, base[c], params[c]) for c in spec.modules}


def kohya_tensors(spec: LoRASpec, params: Mapping, dtype: str | None = None,
                  unet_names: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Factors -> kohya tensors: `<prefix><module>.lora_down.weight` (r, in[, kh, kw]),
    `.lora_up.weight` (out, r[, 1, 1]) and `.alpha` (scalar), torch layout, in `dtype`
    (default float32; "float16" / "bfloat16" as kohya's `--save_precision`). unet_names: UNet
    module names to write instead of the diffusers ones (SDXL: the SGM names sd-scripts writes,
    `sdjax.weights.lora.sgm_names`)."""
    np_dtype = {None: np.float32, "float32": np.float32, "float16": np.float16,
                "bfloat16": jnp.bfloat16}[dtype]
    out: dict[str, np.ndarray] = {}
    for component, modules in spec.modules.items():
        for name in modules:
            p = params[component][name]
            down = to_torch_layout("kernel", np.asarray(p["down"], np.float32))
            up = np.asarray(p["up"], np.float32).T
            if down.ndim == 4:
                up = up[:, :, None, None]
            key = KOHYA_PREFIX[component] + ((unet_names or {}).get(name, name) if component == "unet" else name)
            out[f"{key}.lora_down.weight"] = np.ascontiguousarray(down).astype(np_dtype)
            out[f"{key}.lora_up.weight"] = np.ascontiguousarray(up).astype(np_dtype)
            out[f"{key}.alpha"] = np.asarray(spec.alpha, np.float32).astype(np_dtype)
    return out


def save_kohya(path: str | Path, spec: LoRASpec, params: Mapping, *, dtype: str | None = None,
               metadata: Mapping[str, str] | None = None, unet_names: Mapping[str, str] | None = None) -> Path:
    """Write a kohya-format LoRA `.safetensors` with `ss_network_*` metadata; returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
            "ss_network_alpha": str(int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha),
            "ss_network_args": json.dumps({"targets": {c: sorted(m) for c, m in spec.modules.items()}}),
            "ss_training_comment": "trained with sdjax", **(metadata or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(kohya_tensors(spec, params, dtype, unet_names), str(tmp), metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)  # atomic: a crash never leaves a half-written LoRA under the final name
    return path


__all__ = ["DEFAULT_TARGETS", "GROUPS", "LoRASpec", "parse_targets", "make_spec", "init_params", "delta",
           "apply", "merged_states", "kohya_tensors", "save_kohya"]
