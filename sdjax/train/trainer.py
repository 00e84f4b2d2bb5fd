"""Fine-tuning, top to bottom: models, data, mesh, state, loop, checkpoints, logs, export.

SDXL (base) trains its UNet with both text encoders frozen: the context is their penultimate
hidden states, the pooled embedding bigG's projection, and the time ids each example's original
size, crop top-left (from the dataset's resize and crop) and the training resolution.

`train(cfg)` resumes from the newest checkpoint in `cfg.output_dir/checkpoints`
when there is one, and then continues exactly as if never stopped: the data order,
caption dropout and noise are all functions of (seed, step), and the optimizer
state, EMA and step come back from the checkpoint. A NaN / inf loss or gradient norm stops
the run at once (`NonFiniteLossError`) without saving that state, so the newest checkpoint
is the last good one; non-finite weights are never exported.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import parallel
from sdjax.data.datasets import CaptionLoader, open_dataset
from sdjax.errors import ConfigError, NonFiniteLossError, SdjaxError
from sdjax.images import save_png
from sdjax.models.layers import apply_kernels
from sdjax.pipeline import load_pipeline
from sdjax.pipeline.generator import Generator
from sdjax.sampling import DiscreteModel
from sdjax.train import lora as lora_lib, step as train_step_lib
from sdjax.train.checkpoint import Checkpointer
from sdjax.train.config import TrainConfig
from sdjax.train.logs import MetricsLog, plot_loss
from sdjax.weights.diffusers import abstract_model
from sdjax.weights.export import save_pipeline
from sdjax.weights.lora import sgm_names


class Trainer:
    """Holds the models, data and jitted step of one run. `run()` trains to cfg.max_steps."""

    def __init__(self, cfg: TrainConfig, *, dataset=None, mesh=None, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.pipe = load_pipeline(cfg.model, dtype="float32", attention=cfg.attention)
        self.sdxl = self.pipe.family != "sd"
        if self.sdxl:
            _check_sdxl(cfg, self.pipe)
        self.dataset = dataset if dataset is not None else open_dataset(cfg.data, resolution=cfg.resolution)
        # One optimizer step consumes grad_accum loader batches of batch_size examples.
        self.loader = CaptionLoader(self.dataset, cfg.batch_size * cfg.grad_accum, seed=cfg.seed,
                                    caption_dropout=cfg.caption_dropout)
        # Data parallel over as many devices as evenly split the batch.
        self.mesh = mesh or parallel.make_mesh(data=math.gcd(cfg.batch_size, jax.device_count()))
        model = DiscreteModel.from_config(self.pipe.scheduler_config)
        compute = jnp.bfloat16 if cfg.mixed_precision == "bf16" else jnp.float32

        unet_graph = self._graphdef(self.pipe.unet, compute)
        te_graph = self._graphdef(self.pipe.text_encoder, compute)

        def unet_apply(state, x, t, ctx, **added):
            return nnx.merge(unet_graph, state)(x, t, ctx, **added)

        def text_apply(state, ids):
            return nnx.merge(te_graph, state)(ids).last_hidden_state

        if self.sdxl:
            te2_graph = self._graphdef(self.pipe.text_encoder_2, compute)

            def text_apply(states, ids):
                # SDXL: penultimate hidden states of both encoders, bigG's projected pooled output.
                out1 = nnx.merge(te_graph, states[0])(ids[:, 0], output_hidden_states=True)
                out2 = nnx.merge(te2_graph, states[1])(ids[:, 1], output_hidden_states=True)
                context = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
                return jax.lax.stop_gradient(context), jax.lax.stop_gradient(out2.text_embeds)

        if cfg.gradient_checkpointing:
            # Recompute the UNet's activations in the backward pass instead of storing them,
            # keeping only matmul/conv results without batch dimensions.
            unet_apply = jax.checkpoint(unet_apply, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        vae_graph = self.pipe.vae.graphdef

        def vae_encode(state, images):
            return nnx.merge(vae_graph, state).encode(images)

        # LoRA: the trainable params are low-rank factors; the step merges them into the frozen base.
        self.lora = lora_lib.make_spec({"unet": self.pipe.unet.state, "text_encoder": self.pipe.text_encoder.state},
                                       cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else None
        merge_params = (lambda trainable, frozen: lora_lib.merged_states(self.lora, frozen, trainable)) \
            if self.lora is not None else None
        self.optimizer = train_step_lib.make_optimizer(cfg)
        step_fn = train_step_lib.make_train_step(
            cfg, self.optimizer, unet_apply=unet_apply, text_apply=text_apply, vae_encode=vae_encode,
            scaling_factor=float(self.pipe.vae.config.scaling_factor),
            alphas_cumprod=jnp.asarray(model.alphas_cumprod, jnp.float32),
            prediction_type=model.prediction_type, merge_params=merge_params)

        repl = parallel.replicated(self.mesh)
        # Weights (and their AdamW moments and EMA) replicated, or FSDP-sharded when the mesh
        # has an fsdp axis; XLA then gathers weights where used and reduce-scatters gradients.
        self.param_mode = "fsdp" if self.mesh.shape["fsdp"] > 1 else "replicate"
        # Copies: the train state is donated to the step, and must not alias the pipeline's weights.
        put = lambda tree: parallel.shard_params(tree, self.mesh, self.param_mode, copy=True)  # noqa: E731
        params = {"unet": put(self.pipe.unet.state)}
        frozen = {"vae": put(self.pipe.vae.state)}
        if self.lora is not None:  # base UNet frozen: neither in the optimizer state nor updated
            frozen["unet"] = params.pop("unet")
            params = put(lora_lib.init_params(self.lora, {"unet": self.pipe.unet.state,
                                                          "text_encoder": self.pipe.text_encoder.state},
                                              jax.random.fold_in(jax.random.key(cfg.seed), 1)))
        if cfg.train_text_encoder:
            params["text_encoder"] = put(self.pipe.text_encoder.state)
        else:
            frozen["text_encoder"] = put(self.pipe.text_encoder.state)
        if self.sdxl:
            frozen["text_encoder_2"] = put(self.pipe.text_encoder_2.state)
        self.frozen = frozen
        # Every leaf placed explicitly (optimizer counters included), so a restored state
        # lands on the same devices as a fresh one.
        # One compiled program builds the optimizer state and the EMA, not one per weight shape.
        init = jax.jit(lambda p: train_step_lib.init_state(p, self.optimizer, ema=cfg.ema_decay is not None))
        self.state = put(init(params))
        self.batch_sharding = parallel.batch_sharding(self.mesh, batch_axis=1)
        # The new state keeps the old one's shardings (so donation reuses its buffers).
        self.step_fn = jax.jit(step_fn, donate_argnums=(0,),
                               out_shardings=(parallel.param_shardings(self.state, self.mesh, self.param_mode), repl))
        self.checkpointer = Checkpointer(self.out / "checkpoints", keep=cfg.keep_checkpoints)
        self.run_key = jax.random.key(cfg.seed)
        self.step = 0
        latest = self.checkpointer.latest_step()
        if latest is not None:
            self.state, meta = self.checkpointer.restore(self.state, latest)
            self.step = int(meta["step"])
            self.log(f"resumed from checkpoint at step {self.step}")
        self.metrics = MetricsLog(self.out, resume_step=self.step)
        (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    @staticmethod
    def _graphdef(component, compute_dtype):
        """The component's graph with `compute_dtype` compute, float32 parameters and the
        component's attention / conv implementations."""

        cls, config = type(nnx.merge(component.graphdef, component.state)), component.config
        model = abstract_model(cls, config, compute_dtype, param_dtype=jnp.float32)
        if component.kernels is not None:
            apply_kernels(model, component.kernels)
        return nnx.split(model)[0]

    def batch(self, step: int) -> dict:
        """The (grad_accum, batch_size, ...) batch of optimizer step `step`, sharded over data."""
        cfg = self.cfg
        b = self.loader.batch(step)
        tokenizers = [self.pipe.tokenizer] + ([self.pipe.tokenizer_2] if self.sdxl else [])
        ids = np.stack([tok(b["captions"], padding="max_length", truncation=True, max_length=tok.model_max_length,
                            return_tensors="np").input_ids for tok in tokenizers], axis=1)  # (B, encoders, 77)
        ids = ids if self.sdxl else ids[:, 0]
        shape = (cfg.grad_accum, cfg.batch_size)
        batch = {"images": b["images"].reshape(*shape, *b["images"].shape[1:]),
                 "input_ids": ids.astype(np.int32).reshape(*shape, *ids.shape[1:])}
        if self.sdxl:  # original (h, w), crop (top, left), target (h, w): diffusers' SDXL training
            h, w = b["images"].shape[1:3]
            target = np.broadcast_to(np.asarray([h, w], np.int64), (len(b["crops"]), 2))
            time_ids = np.concatenate([b["crops"], target], axis=1).astype(np.float32)
            batch["time_ids"] = time_ids.reshape(*shape, 6)
        return jax.device_put(batch, self.batch_sharding)

    def save(self) -> None:
        per_step = self.cfg.batch_size * self.cfg.grad_accum
        self.checkpointer.save(self.step, self.state, {"step": self.step, "examples_seen": self.step * per_step,
                                                       "config": self.cfg.to_dict()})

    def run(self, stop_at: int | None = None, progress: bool = True) -> list[dict]:
        """Train until `stop_at` (default cfg.max_steps); returns this call's metric records."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        end = min(stop_at or cfg.max_steps, cfg.max_steps)
        records = []
        bar = tqdm(total=end, initial=self.step, disable=not progress, desc="train", unit="step")
        t0 = time.perf_counter()
        while self.step < end:
            key = jax.random.fold_in(self.run_key, self.step)
            self.state, m = self.step_fn(self.state, self.frozen, self.batch(self.step), key)
            self.step += 1
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                # This state is poisoned (the old one was donated): never save it; the newest
                # checkpoint stays the last good one.
                bar.close()
                last = self.checkpointer.latest_step()
                raise NonFiniteLossError(
                    f"step {self.step}: loss {loss}, gradient norm {grad_norm} -- training stopped; the last "
                    f"good checkpoint ({'step ' + str(last) if last is not None else 'none yet'}) is kept. "
                    "Lower learning_rate or max_grad_norm, or use mixed_precision 'no'; rerun to resume from it")
            rec = {"step": self.step, "loss": loss, "grad_norm": grad_norm,
                   "examples_per_s": cfg.batch_size * cfg.grad_accum / max(time.perf_counter() - t0, 1e-9)}
            t0 = time.perf_counter()
            records.append(rec)
            if self.step % cfg.log_every == 0 or self.step == end:
                self.metrics.write(rec)
                plot_loss(self.metrics.read(), self.out / "loss.png")
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.write_samples()
        bar.close()
        return records

    def trained_states(self, use_ema: bool = True) -> dict:
        """The component states to export: EMA weights when EMA is on (and `use_ema`)."""
        params = self.state["ema"] if (use_ema and self.state["ema"] is not None) else self.state["params"]
        if self.lora is not None:  # base weights with the LoRA merged in
            merged = jax.jit(lambda p, f: lora_lib.merged_states(self.lora, f, p))(params, self.frozen)
            return {"unet": self.frozen["unet"], **merged}
        return dict(params)

    def export(self, out_dir: str | Path | None = None, *, dtype: str | None = None,
               use_ema: bool = True) -> Path:
        """Write the trained model as a diffusers folder (safetensors) that diffusers loads."""

        if self.lora is not None:
            return self.export_lora(out_dir, dtype=dtype, use_ema=use_ema)
        out_dir = Path(out_dir) if out_dir is not None else self.out / "model"
        states = self.trained_states(use_ema)
        check_finite(states)
        return save_pipeline(self.pipe, out_dir, dtype=dtype, unet_state=states["unet"],
                             text_encoder_state=states.get("text_encoder"))

    def export_lora(self, path: str | Path | None = None, *, dtype: str | None = None,
                    use_ema: bool = True) -> Path:
        """Write the trained LoRA as a kohya `.safetensors` (A1111 / ComfyUI / diffusers load it).
        path: a `.safetensors` file, or a folder for `<folder>/lora.safetensors` (default: output_dir)."""
        path = Path(path) if path is not None else self.out
        if path.suffix != ".safetensors":
            path = path / "lora.safetensors"
        params = self.state["ema"] if (use_ema and self.state["ema"] is not None) else self.state["params"]
        check_finite(params)
        cfg = self.cfg
        meta = {"ss_steps": self.step, "ss_learning_rate": cfg.learning_rate, "ss_resolution": cfg.resolution,
                "ss_seed": cfg.seed, "ss_num_train_images": len(self.dataset),
                "ss_base_model_version": {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(
                    self.pipe.unet.config.cross_attention_dim[0], "sdjax_custom")}
        # SDXL LoRAs are written as sd-scripts writes them: UNet modules under their SGM names.
        unet_names = sgm_names(self.lora.modules.get("unet", ()), dataclasses.asdict(self.pipe.unet.config)) \
            if self.sdxl else None
        return lora_lib.save_kohya(path, self.lora, jax.device_get(params), dtype=dtype, metadata=meta,
                                   unet_names=unet_names)

    def write_samples(self) -> None:
        """Images for cfg.sample_prompts with the current weights, under `samples/<step>/`."""
        if not self.cfg.sample_prompts:
            return

        pipe = _with_states(self.pipe, self.trained_states())
        folder = self.out / "samples" / f"{self.step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(self.cfg.sample_prompts):
            result = pipe.generate(prompt, steps=self.cfg.sample_steps, seed=self.cfg.seed + i,
                                   width=self.cfg.resolution, height=self.cfg.resolution)
            save_png(result.images[0], folder / f"{i:03d}.png", result.infotexts[0])


def _check_sdxl(cfg: TrainConfig, pipe) -> None:
    """What SDXL training supports: the base model's UNet (full or LoRA), text encoders frozen."""
    if pipe.family != "sdxl":
        raise ConfigError(f"{cfg.model}: training supports the SDXL base model, not the {pipe.family} "
                          "(its aesthetic-score time ids)")
    if cfg.train_text_encoder or (cfg.lora_rank and any(t.startswith("text_encoder") for t in cfg.lora_targets)):
        raise ConfigError("SDXL training keeps both text encoders frozen: set train_text_encoder false and use "
                          "UNet lora_targets only")


def check_finite(states) -> None:
    """NonFiniteLossError naming how many weight tensors hold NaN / inf (nothing is exported then)."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(states)]  # on the host: no program per weight shape
    bad = sum(not np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.inexact))
    if bad:
        raise NonFiniteLossError(f"{bad} of {len(leaves)} weight tensors hold NaN/inf values; refusing to export "
                                 "them (resume from an earlier checkpoint with a lower learning_rate)")


def train(cfg: TrainConfig, *, progress: bool = True, export_dtype: str | None = None, **kw) -> Trainer:
    """Run (or resume) a fine-tuning run to the end and export it (a diffusers folder at
    output_dir/model, or output_dir/lora.safetensors for LoRA runs, path in `trainer.exported`);
    `kw` goes to Trainer. Returns the Trainer."""
    trainer = Trainer(cfg, **kw)
    trainer.run(progress=progress)
    trainer.exported = trainer.export(dtype=export_dtype)
    return trainer


def _with_states(pipe, states: dict):
    """A shallow copy of `pipe` whose components in `states` ({"unet": state, ...}) use those
    weights (same graphs, so the same compiled functions); nothing of `pipe` changes, and its
    per-pipeline caches (placed weights, loaded networks) are not carried over."""
    new = copy.copy(pipe)
    for name, state in states.items():
        component = copy.copy(getattr(pipe, name))
        component.state = state
        setattr(new, name, component)
    new.generator = Generator(new)  # its own caches: the placed weights must be the new ones
    return new
