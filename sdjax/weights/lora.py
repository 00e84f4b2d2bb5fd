"""LoRA files (kohya, PEFT/diffusers, old diffusers attention processors) merged into weight pytrees.

A LoRA adds `scale * up @ down` to a weight W (torch layout (out, in) or
(out, in, kh, kw)), with `scale = multiplier * alpha / rank` (alpha defaults to
the rank, so PEFT files without alphas have scale = multiplier). Merging happens
once, into the weights pytree, so sampling pays nothing per step.

Formats read by `parse_lora`:
- kohya / A1111: `lora_unet_<module>` and `lora_te_<module>` (also `lora_te1_`; SDXL's second
  encoder `lora_te2_`), module names with `_` for `.`, tensors `.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; conv LoRAs (LoCon): down a (r, in, kh, kw) conv, up a (out, r, 1, 1) conv. UNet module
  names in diffusers layout (`down_blocks_1_attentions_0_...`) or, as sd-scripts writes SDXL LoRAs,
  in the original SGM layout (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `input_blocks_1_0_in_layers_2`, `label_emb_0_0`): `merge` resolves those through
  `sdjax.weights.ldm.unet_table` given the UNet's config;
- PEFT / diffusers: `unet.<module>.lora_A.weight` / `.lora_B.weight`,
  `text_encoder.<module>...` / `text_encoder_2.<module>...` (with or without `text_model.`);
- older diffusers: `.lora.down.weight` / `.lora.up.weight`,
  `.lora_linear_layer.down/up.weight`, and attention processors
  `<attn>.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`).

    lora = read_lora("style.safetensors")
    new_states, undo = merge({"unet": unet_state, "text_encoder": te_state}, [(lora, 0.8, 0.8)])
    states = unmerge(new_states, undo)          # bit-exact originals
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.errors import CheckpointError
from sdjax.weights import ldm
from sdjax.weights.files import read_weight_file
from sdjax.weights.mapping import to_jax_layout

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class LoRAModule:
    """One adapted module. key: its name with `_` for `.` (matching is on this form).
    down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1); alpha: None = rank."""

    component: str
    key: str
    down: np.ndarray
    up: np.ndarray
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """`alpha / rank * up @ down` in float32, torch layout (out, in) or (out, in, kh, kw)."""
        up = np.asarray(self.up, np.float32).reshape(self.up.shape[0], -1)
        down = np.asarray(self.down, np.float32).reshape(self.rank, -1)
        if up.shape[1] != self.rank:
            raise CheckpointError(f"LoRA module {self.key}: up has rank {up.shape[1]}, down {self.rank}")
        d = (up @ down).reshape((up.shape[0],) + tuple(self.down.shape[1:]))
        scale = (self.alpha / self.rank) if self.alpha is not None else 1.0
        return d * np.float32(scale)


@dataclass(frozen=True)
class LoRA:
    """A parsed LoRA file: `name` (file stem) and its modules."""

    name: str
    modules: tuple[LoRAModule, ...]


# (suffix, role), longest first where one suffix ends another.
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "dora_scale": "DoRA",
                "lora_mid": "LyCORIS LoCon with CP decomposition (lora_mid)", ".diff": "full weight differences",
                "oft_": "OFT", "bias_indices": "LyCORIS bias diff"}
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def _split_key(key: str) -> tuple[str, str, str]:
    """'lora_unet_x_y.lora_down.weight' -> (component, module key in `_` form, role)."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        for marker, what in _UNSUPPORTED.items():
            # ".diff" / ".diff_b" end LyCORIS full-difference keys; "diffusion_model" is no marker.
            if (key.endswith((".diff", ".diff_b")) if marker == ".diff" else marker in key):
                raise CheckpointError(f"LoRA tensor {key!r}: {what} is not supported (plain LoRA/LoCon only)")
        raise CheckpointError(f"LoRA tensor {key!r}: not a LoRA down/up/alpha tensor")
    module = _OLD_PROCESSOR.sub(lambda m: "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1)), module)
    for prefix, component in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder"),
                              ("lora_te2_", "text_encoder_2"), ("unet.", "unet"), ("text_encoder.", "text_encoder"),
                              ("text_encoder_2.", "text_encoder_2")):
        if module.startswith(prefix):
            return component, module[len(prefix):].replace(".", "_"), role
    if module.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
        return "unet", module.replace(".", "_"), role  # old `unet.save_attn_procs` files: no prefix
    raise CheckpointError(f"LoRA tensor {key!r}: cannot tell whether it adapts the UNet or the text encoder")


def parse_lora(flat: Mapping[str, Any], name: str = "lora", strict: bool = True) -> LoRA:
    """Flat LoRA tensors (any supported format) -> `LoRA`. Pure; raises CheckpointError naming
    the tensor for unsupported LyCORIS variants or a module with down but no up (or vice versa).
    strict=False: tensors that are not LoRA tensors at all (or whose model part cannot be
    told) are skipped with one warning listing them instead of failing."""
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: list[str] = []
    for key, arr in flat.items():
        try:
            component, module, role = _split_key(key)
        except CheckpointError as e:
            if strict or not ("not a LoRA" in str(e) or "cannot tell" in str(e)):
                raise
            skipped.append(key)
            continue
        parts.setdefault((component, module), {})[role] = arr
    if skipped:
        warnings.warn(f"LoRA {name}: {len(skipped)} tensors are not LoRA tensors and were skipped: "
                      + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""), stacklevel=2)
    modules = []
    for (component, module), p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise CheckpointError(f"LoRA {name}: module {module} ({component}) has "
                                  f"{' and '.join(sorted(p))} but needs both down and up")
        alpha = p.get("alpha")
        alpha = float(np.asarray(alpha, np.float32).reshape(())) if alpha is not None else None
        modules.append(LoRAModule(component, module, np.asarray(p["down"]), np.asarray(p["up"]), alpha))
    return LoRA(name, tuple(modules))


def read_lora(path: str | os.PathLike, name: str | None = None, strict: bool = True) -> LoRA:
    """A LoRA file (`.safetensors`, or `.pt`/`.bin`/`.ckpt` through the restricted unpickler) -> LoRA.
    name defaults to the file stem (the name `<lora:NAME:0.8>` prompt tags use)."""

    path = Path(path)
    return parse_lora(read_weight_file(path), name or path.stem, strict)


def module_index(state: nnx.State, component: str, unet_config: Mapping[str, Any] | None = None
                 ) -> dict[str, tuple]:
    """`_`-form module names -> state path of the module's `kernel` (Linear and Conv modules).

    Text-encoder modules are also reachable with the transformers v4 `text_model_` prefix; with
    `unet_config` (a diffusers UNet config dict), UNet modules also by their SGM / LDM names
    (`input_blocks_4_1_...`, `middle_block_1_...`, `label_emb_0_0`), as kohya's SDXL LoRAs name them.
    """
    index: dict[str, tuple] = {}
    for path, _ in nnx.to_flat_state(state):
        if path[-1] != "kernel":
            continue
        key = "_".join(str(p) for p in path[:-1])
        index[key] = path
        if component.startswith("text_encoder"):
            index["text_model_" + key] = path
    if component == "unet" and unet_config is not None:
        for d_key, s_key in sgm_names(index, unet_config).items():
            index.setdefault(s_key, index[d_key])
    return index


def sgm_names(keys: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """`_`-form diffusers UNet module names -> their `_`-form SGM / LDM names (kohya's SDXL
    spelling: `down_blocks_1_attentions_0_proj_in` -> `input_blocks_4_1_proj_in` for SDXL);
    {} for a UNet the LDM tables do not describe."""
    keys = list(keys)
    try:
        table = ldm.unet_table(unet_config)
    except (KeyError, TypeError, ValueError):
        return {}
    prefixes = sorted(((d.replace(".", "_"), l.replace(".", "_"), {k.replace(".", "_"): v.replace(".", "_")
                                                                   for k, v in inner.items()})
                       for d, l, inner in table), key=lambda row: -len(row[0]))
    out = {}
    for key in keys:
        for d, l, inner in prefixes:
            if key == d or key.startswith(d + "_"):
                rest = key[len(d) + 1:]
                out[key] = "_".join(p for p in (l, inner.get(rest, rest)) if p)
                break
    return out


def _fit(delta: np.ndarray, kernel_shape: tuple[int, ...], key: str) -> np.ndarray:
    """A torch-layout delta -> the kernel's layout, accepting linear LoRAs on 1x1 convs and back."""
    if len(kernel_shape) == 4 and delta.ndim == 2:
        delta = delta[:, :, None, None]
    elif len(kernel_shape) == 2 and delta.ndim == 4 and delta.shape[2:] == (1, 1):
        delta = delta[:, :, 0, 0]
    out = to_jax_layout("kernel", delta)
    if tuple(out.shape) != tuple(kernel_shape):
        raise CheckpointError(f"LoRA module {key}: its update has shape {delta.shape} (torch layout), which does "
                              f"not fit the model weight (layout-converted shape {tuple(kernel_shape)})")
    return out


def merge(states: Mapping[str, nnx.State], loras: Iterable[tuple[LoRA, float, float]], *,
          strict: bool = True, unet_config: Mapping[str, Any] | None = None
          ) -> tuple[dict[str, nnx.State], dict[str, dict[tuple, jax.Array]]]:
    """Add LoRAs to weight pytrees. Returns (new_states, undo).

    states: {"unet": State, "text_encoder": State, "text_encoder_2": State} (any may be absent;
    others pass through). loras: (LoRA, unet_multiplier, text_encoder_multiplier) per LoRA (the
    text-encoder multiplier applies to both SDXL encoders). unet_config: the UNet's diffusers config
    dict, so that UNet modules named in the SGM layout resolve (`module_index`). Each
    touched kernel becomes `(W + sum_i m_i * alpha_i / r_i * up_i @ down_i)` computed in
    float32 and cast back to W's dtype (and placed with W's sharding). `undo` keeps
    the original arrays of the touched leaves, so `unmerge` is bit-exact.
    Modules that match nothing raise CheckpointError listing them; with
    `strict=False` they are skipped with one warning listing them. The input
    states are not modified.
    """
    loras = list(loras)
    new_states = dict(states)
    undo: dict[str, dict[tuple, jax.Array]] = {}
    unmatched: list[str] = []
    for component in COMPONENTS:
        wanted = [(m, mults[0] if component == "unet" else mults[1], lora.name)
                  for lora, *mults in loras for m in lora.modules if m.component == component]
        if not wanted:
            continue
        if component not in states:
            unmatched += [f"{name}: {component} module {m.key} (no {component} state given)" for m, _, name in wanted]
            continue
        flat = dict(nnx.to_flat_state(states[component]))
        index = module_index(states[component], component, unet_config)
        deltas: dict[tuple, np.ndarray] = {}
        for module, mult, name in wanted:
            path = index.get(module.key)
            if path is None:
                unmatched.append(f"{name}: {component} module {module.key}")
                continue
            if mult == 0:
                continue
            kernel = flat[path].get_value()
            d = _fit(module.delta(), kernel.shape, module.key) * np.float32(mult)
            deltas[path] = deltas[path] + d if path in deltas else d
        updated = {}
        for path, d in deltas.items():
            w = flat[path].get_value()
            new = (w.astype(jnp.float32) + jnp.asarray(d)).astype(w.dtype)
            sharding = getattr(w, "sharding", None)
            if sharding is not None and getattr(new, "sharding", None) != sharding:
                new = jax.device_put(new, sharding)
            updated[path] = new
        if updated:
            undo[component] = {path: flat[path].get_value() for path in updated}
            new_states[component] = _replace(states[component], updated)
    if unmatched:
        msg = f"{len(unmatched)} LoRA modules match no model weight: " + "; ".join(unmatched[:30]) + \
            (f" ... and {len(unmatched) - 30} more" if len(unmatched) > 30 else "")
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg + " (skipped)", stacklevel=2)
    return new_states, undo


def unmerge(states: Mapping[str, nnx.State], undo: Mapping[str, Mapping[tuple, jax.Array]]
            ) -> dict[str, nnx.State]:
    """Put back the original arrays recorded by `merge`: the exact pre-merge weights."""
    out = dict(states)
    for component, originals in undo.items():
        out[component] = _replace(states[component], originals)
    return out


def _replace(state: nnx.State, arrays: Mapping[tuple, jax.Array]) -> nnx.State:
    """A new State with the leaves at `arrays`' paths replaced; other Variables are shared."""
    return nnx.from_flat_state([(path, var.replace(arrays[path]) if path in arrays else var)
                                for path, var in nnx.to_flat_state(state)])


def load_loras(requests: Iterable[tuple[str, float] | tuple[str, float, float]], lora_dir: str | os.PathLike,
               cache: dict[str, LoRA] | None = None) -> list[tuple[LoRA, float, float]]:
    """`<lora:name:m>` requests -> merge() input. requests: (name, m) or (name, unet_m, te_m);
    each name is looked up as `<lora_dir>/<name>.safetensors` (then .pt, .ckpt, .bin). `cache`
    (name -> LoRA) avoids re-reading files between prompts."""
    out = []
    for req in requests:
        name, unet_m, te_m = (req[0], req[1], req[1]) if len(req) == 2 else req
        if cache is not None and name in cache:
            lora = cache[name]
        else:
            for ext in (".safetensors", ".pt", ".ckpt", ".bin"):
                path = Path(lora_dir) / f"{name}{ext}"
                if path.is_file():
                    break
            else:
                raise CheckpointError(f"LoRA {name!r} not found in {lora_dir} (looked for {name}.safetensors, "
                                      f".pt, .ckpt, .bin)")
            lora = read_lora(path, name)
            if cache is not None:
                cache[name] = lora
        out.append((lora, float(unet_m), float(te_m)))
    return out


__all__ = ["LoRA", "LoRAModule", "parse_lora", "read_lora", "module_index", "sgm_names", "merge", "unmerge",
           "load_loras"]
