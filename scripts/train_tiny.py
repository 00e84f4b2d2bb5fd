"""Train sdjax's embedded default model from scratch, on sdjax's own synthetic shapes.

    python scripts/train_tiny.py --out runs/tiny [--install]

Stages, each resumable (rerun the same command after an interruption):
  1. tokenizer: a small CLIP-format BPE tokenizer trained on the captions (template and varied);
  2. init: random weights for the text encoder, VAE and UNet of configs/tiny_model.json,
     written as a diffusers folder;
  3. vae: the AutoencoderKL trained alone (reconstruction + small KL), then its
     scaling_factor set to 1 / std of the latents (--vae-from DIR instead takes the VAE of
     an earlier run's model folder: the images, all the VAE sees, do not depend on captions);
  4. unet: UNet and text encoder trained together through the fine-tuning stack
     (`sdjax.train.Trainer`), EMA weights exported; captions as people write them
     (`--captions varied`, `sdjax.data.phrasing`'s training frames, 30% in the template);
  (--init-from DIR skips stages 1-3: the UNet stage fine-tunes that trained model instead;
   with --vae-decoder-steps N, its VAE decoder is first fine-tuned alone, the encoder and so the
   latents unchanged, edge-weighted: small shapes keep their corners; --unet-steps 0 then skips
   the UNet stage;)
  5. export: fp16 safetensors diffusers folder at <out>/model (and, with --install,
     copied into sdjax/assets/tiny, where `sdjax generate` finds it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sdjax import runtime

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_minutes() -> float:
    """CPU time of this process (all threads) in minutes: the cost when other work shares the cores."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) / 60


def stage_tokenizer(out: Path) -> Path:
    from sdjax.data.tokenizer import train_tokenizer

    folder = out / "tokenizer"
    if not (folder / "vocab.json").exists():
        train_tokenizer(folder)
        log(f"tokenizer written to {folder}")
    return folder


def stage_init(out: Path, spec: dict, tokenizer_dir: Path, seed: int) -> Path:
    from sdjax.train.init import init_pipeline_folder

    folder = out / "init"
    if not (folder / "model_index.json").exists():
        tmp = out / "init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        init_pipeline_folder(tmp, spec, tokenizer_dir, seed)
        tmp.rename(folder)
        log(f"random initial weights written to {folder}")
    return folder


def stage_vae(out: Path, init_dir: Path, spec: dict, args) -> Path:
    from flax import nnx

    from sdjax.data.datasets import SyntheticCaptions
    from sdjax.pipeline import load_pipeline
    from sdjax.train.vae import train_vae
    from sdjax.weights import export
    from sdjax.weights.mapping import export_state

    folder = out / "vae_done"
    if (folder / "model_index.json").exists():
        return folder
    if args.vae_from:
        tmp = out / "vae_done.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(init_dir, tmp)
        shutil.rmtree(tmp / "vae")
        shutil.copytree(Path(args.vae_from) / "vae", tmp / "vae")
        tmp.rename(folder)
        log(f"vae taken from {args.vae_from}")
        return folder
    pipe = load_pipeline(init_dir)
    data = SyntheticCaptions(65536, seed=args.seed, resolution=spec["resolution"])
    params, scaling = train_vae(pipe.vae, data, out / "vae_run", steps=args.vae_steps,
                                batch_size=args.vae_batch, learning_rate=args.vae_lr, seed=args.seed,
                                edge_weight=args.vae_edge_weight, log=log)
    log(f"vae trained; latent scaling_factor = {scaling:.4f}")
    tmp = out / "vae_done.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init_dir, tmp)
    vae_cfg = json.loads((init_dir / "vae" / "config.json").read_text())
    vae_cfg["scaling_factor"] = round(scaling, 5)
    export.save_component(tmp, "vae", export_state(nnx.merge(pipe.vae.graphdef, params)), vae_cfg)
    tmp.rename(folder)
    return folder


def stage_vae_decoder(out: Path, src: Path, args) -> Path:
    """A copy of the model folder `src` whose VAE decoder is fine-tuned alone (`train_vae(parts=
    "decoder")`): the encoder, the scaling factor and so the UNet's latents stay as they are."""
    from flax import nnx

    from sdjax.data.datasets import SyntheticCaptions
    from sdjax.pipeline import load_pipeline
    from sdjax.train.vae import train_vae
    from sdjax.weights import export
    from sdjax.weights.mapping import export_state

    folder = out / "vae_decoder_done"
    if (folder / "model_index.json").exists():
        return folder
    pipe = load_pipeline(src)
    vae_cfg = json.loads((src / "vae" / "config.json").read_text())
    data = SyntheticCaptions(65536, seed=0, resolution=vae_cfg["sample_size"])
    t0 = time.time()
    params, _ = train_vae(pipe.vae, data, out / "vae_decoder_run", steps=args.vae_decoder_steps,
                          batch_size=args.vae_batch, learning_rate=args.vae_decoder_lr, seed=args.seed,
                          edge_weight=args.vae_edge_weight, parts="decoder", latent_noise=args.vae_latent_noise,
                          log=log)
    log(f"vae decoder stage: {(time.time() - t0) / 60:.1f} min wall")
    tmp = out / "vae_decoder_done.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for old in (tmp / "vae").glob("*.safetensors"):
        old.unlink()
    export.save_component(tmp, "vae", export_state(nnx.merge(pipe.vae.graphdef, params)), vae_cfg,
                          dtype="float16")
    tmp.rename(folder)
    log(f"fine-tuned vae decoder written to {folder}")
    return folder


def stage_unet(out: Path, vae_dir: Path, spec: dict, args) -> Path:
    from sdjax.data.datasets import SyntheticCaptions
    from sdjax.data.synthetic import SyntheticConfig
    from sdjax.train.config import TrainConfig
    from sdjax.train.trainer import Trainer

    final = out / "model"
    if (final / "model_index.json").exists():
        return final
    if args.unet_steps == 0:  # nothing to train here: the model is the previous stage's
        shutil.copytree(vae_dir, out / "model.tmp", dirs_exist_ok=True)
        (out / "model.tmp").rename(final)
        log(f"no unet stage (--unet-steps 0): {vae_dir} exported as {final}")
        return final
    cfg = TrainConfig(
        model=str(vae_dir), data=f"synthetic:{args.seed}", output_dir=str(out / "unet_run"),
        resolution=spec["resolution"], batch_size=args.unet_batch, max_steps=args.unet_steps,
        learning_rate=args.unet_lr, lr_warmup_steps=min(200, args.unet_steps // 10), lr_end_ratio=0.05,
        weight_decay=0.0, ema_decay=0.995, caption_dropout=0.1, train_text_encoder=True, checkpoint_every=50,
        keep_checkpoints=2, log_every=25, seed=args.seed)
    data = SyntheticCaptions(65536, seed=args.seed, resolution=spec["resolution"],
                             config=SyntheticConfig(captions=args.captions))
    trainer = Trainer(cfg, dataset=data, log=log)
    start_step, t0, c0 = trainer.step, time.time(), cpu_minutes()
    if not args.export_now:
        trainer.run(progress=sys.stderr.isatty())
        steps = trainer.step - start_step
        if steps:
            wall = time.time() - t0
            log(f"unet stage: {steps} steps in {wall / 60:.1f} min wall, {cpu_minutes() - c0:.1f} CPU-min "
                f"({steps / wall:.2f} steps/s, {steps * args.unet_batch / wall:.1f} examples/s)")
    log(f"exporting the weights of step {trainer.step}")
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.export(tmp, dtype="float16")
    tmp.rename(final)
    log(f"exported fp16 model to {final}")
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tiny", help="run folder (resumable)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_model.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1100)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--unet-steps", type=int, default=3500, help="0: no UNet stage")
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--captions", default="varied", choices=("varied", "template"),
                   help="caption style of the UNet stage (sdjax.data.synthetic.SyntheticConfig.captions)")
    p.add_argument("--vae-decoder-steps", type=int, default=0,
                   help="with --init-from: first fine-tune its VAE decoder alone for this many steps")
    p.add_argument("--vae-decoder-lr", type=float, default=2e-3)
    p.add_argument("--vae-edge-weight", type=float, default=8.0,
                   help="extra weight of edge pixels in the VAE loss (sdjax.train.vae.edge_map)")
    p.add_argument("--vae-latent-noise", type=float, default=0.0,
                   help="decoder stage: noise std added to the latents it decodes (scaled latent units)")
    p.add_argument("--vae-from", help="reuse the VAE of this model folder instead of training one")
    p.add_argument("--init-from", help="fine-tune: start the UNet stage from this model folder (all its "
                   "weights and its tokenizer; stages 1-3 are skipped), e.g. sdjax/assets/tiny")
    p.add_argument("--install", action="store_true", help="copy the result into sdjax/assets/tiny")
    p.add_argument("--export-now", action="store_true",
                   help="stop early: export the UNet stage's latest checkpoint instead of training on")
    args = p.parse_args(argv)
    runtime.configure()  # process-wide XLA settings, before JAX starts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(Path(args.config).read_text())
    t0 = time.time()
    if args.init_from:  # fine-tune: a trained model's text encoder, UNet, VAE and tokenizer
        vae_dir = Path(args.init_from)
        log(f"fine-tuning from {vae_dir}")
        if args.vae_decoder_steps:
            vae_dir = stage_vae_decoder(out, vae_dir, args)
    else:
        tok = stage_tokenizer(out)
        init_dir = stage_init(out, spec, tok, args.seed)
        vae_dir = stage_vae(out, init_dir, spec, args)
    model_dir = stage_unet(out, vae_dir, spec, args)
    log(f"done in {(time.time() - t0) / 60:.1f} min wall, {cpu_minutes():.1f} CPU-min in this process: {model_dir}")
    if args.install:
        dst = ROOT / "sdjax" / "assets" / "tiny"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(model_dir, dst)
        log(f"installed into {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
