"""Run configuration for fine-tuning: a frozen dataclass read from JSON (see configs/)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from sdjax.errors import ConfigError
from sdjax.models.kernels import check_attention


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a fine-tuning run needs. Units: steps are optimizer updates.

    model: a diffusers folder (or single file) to start from.
    data: a folder of images with same-name .txt captions, a .jsonl of
      {"image", "caption"}, or "synthetic" / "synthetic:<seed>" for sdjax's shapes.
    One optimizer step consumes batch_size * grad_accum examples.
    """

    model: str
    data: str
    output_dir: str
    resolution: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0
    lr_end_ratio: float = 0.1          # cosine decays to learning_rate * lr_end_ratio
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float | None = None     # e.g. 0.9999; None turns EMA off
    min_snr_gamma: float | None = None  # e.g. 5.0
    offset_noise: float = 0.0
    caption_dropout: float = 0.1
    mixed_precision: str = "no"        # "no" (float32) or "bf16" (bf16 compute, fp32 master weights)
    attention: str | None = None       # sdjax.models.kernels.ATTENTION name; None: SDJAX_ATTENTION or "auto"
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int | None = None
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    seed: int = 0
    # LoRA: with lora_rank set only low-rank factors are trained (base weights frozen);
    # lora_alpha defaults to the rank (scale 1); targets: see sdjax.train.lora (module-name
    # suffixes, "text_encoder:" prefix for the text encoder, groups "attn", "ff",
    # "text_encoder:attn", "text_encoder:mlp").
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def _check_types(self) -> None:
        """Each field against its annotation, with a message naming the key (a JSON "abc" for
        max_steps used to surface as a Python comparison error), and every float finite."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            optional = kind.endswith("| None")
            base = kind.replace("| None", "").strip()
            if value is None:
                if optional:
                    continue
                raise ConfigError(f"{f.name}=null: must be a {base}")
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if base == "int" and not is_int:
                raise ConfigError(f"{f.name}={value!r}: must be a whole number")
            if base == "float":
                if not (is_int or isinstance(value, float)):
                    raise ConfigError(f"{f.name}={value!r}: must be a number")
                if not math.isfinite(value):
                    raise ConfigError(f"{f.name}={value!r}: must be a finite number")
            if base == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name}={value!r}: must be true or false")
            if base == "str" and not isinstance(value, str):
                raise ConfigError(f"{f.name}={value!r}: must be a string")
            if base.startswith("tuple") and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{f.name}={value!r}: must be a list of strings")

    def __post_init__(self):
        self._check_types()
        if self.attention is not None:
            check_attention(self.attention)
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r}: must be a finite number > 0")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: use 'no' or 'bf16'")
        for name in ("resolution", "batch_size", "grad_accum", "max_steps", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution}: must be a multiple of 8")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout={self.caption_dropout}: must be in [0, 1]")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay}: must be in (0, 1), or null for no EMA")
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise ConfigError(f"lora_rank={self.lora_rank!r}: must be a positive integer, or null for full fine-tuning")
            if self.train_text_encoder:
                raise ConfigError("train_text_encoder with lora_rank: LoRA the text encoder through lora_targets "
                                  "instead (e.g. 'text_encoder:attn')")
            if not self.lora_targets:
                raise ConfigError("lora_targets is empty: name at least one module (default: to_q, to_k, to_v, to_out.0)")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha!r}: must be positive, or null for alpha = rank")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" etc. are notes
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; valid options: {sorted(names)}")
        d = dict(d)
        for key in ("sample_prompts", "lora_targets"):
            if isinstance(d.get(key), (list, tuple)):
                d[key] = tuple(d[key])
        try:
            return cls(**d)
        except TypeError as e:  # a required option is missing
            raise ConfigError(f"training config: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read training config {path}: {e}") from None
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sample_prompts"] = list(self.sample_prompts)
        d["lora_targets"] = list(self.lora_targets)
        return d
