"""`sdjax train` in subprocesses: a run's outputs (checkpoints, metrics.jsonl, loss.png, exported
model folder), a SIGKILLed run resumed to the same losses as an uninterrupted one, LoRA runs,
and config errors exiting with status 2 before anything is loaded (one through the script, the
others through the `sdjax.cli.main` it calls, in the test's process)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_main
from test_train import MINI_SPEC

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune_tiny.json"


def _sdjax(*args, **kw):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "sdjax.cli", *map(str, args)]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, **kw)


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    from sdjax.data.tokenizer import train_tokenizer
    from sdjax.train.init import init_pipeline_folder

    root = tmp_path_factory.mktemp("mini_cli")
    return init_pipeline_folder(root / "model", MINI_SPEC, train_tokenizer(root / "tok"), seed=0)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": str(tmp_path), "data": "synthetic", "output_dir": str(tmp_path / "o"),
                               "learnin_rate": 1e-4}))
    r = _sdjax("train", bad)  # the real script: its exit status and stderr
    assert r.returncode == 2 and "unknown training option" in r.stderr and "learnin_rate" in r.stderr
    # The other cases through the same main() in this process (a Python and JAX start each saved).
    status, err = cli_main(capsys, "train", tmp_path / "missing.json")
    assert status == 2 and "cannot read training config" in err
    cases = {("-o", "mixed_precision=fp8"): "mixed_precision", ("-o", "max_steps"): "KEY=VALUE",
             ("-o", f"model={tmp_path / 'nope'}"): "does not exist", ("-o", "lora_rank=0"): "lora_rank"}
    for flags, msg in cases.items():
        status, err = cli_main(capsys, "train", TINY, "-o", f"model={tmp_path}", "-o",
                                  f"output_dir={tmp_path / 'o'}", *flags)
        assert status == 2 and msg in err, (flags, err)
        assert err.count("\n") == 1, err  # one line, no traceback
    (tmp_path / "o" / "checkpoints" / "4").mkdir(parents=True)
    status, err = cli_main(capsys, "train", TINY, "-o", f"model={tmp_path}", "-o",
                              f"output_dir={tmp_path / 'o'}", "--no-resume")
    assert status == 2 and "already has checkpoints" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_train_outputs_and_killed_run_resumes_exactly(mini_model, tmp_path):
    common = ["-o", f"model={mini_model}", "-o", "max_steps=16", "-o", "checkpoint_every=4", "--no-progress"]
    full = tmp_path / "full"
    r = _sdjax("train", TINY, *common, "-o", f"output_dir={full}")
    assert r.returncode == 0, r.stderr
    model = full / "model"
    assert r.stdout.strip().splitlines()[-1] == str(model)
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 0
    assert sorted(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit()) == [12, 16]
    assert (full / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses = _losses(full)
    assert len(losses) == 16 and np.all(np.isfinite(losses))
    assert json.loads((full / "train_config.json").read_text())["max_steps"] == 16

    split = tmp_path / "split"
    proc = _sdjax("train", TINY, *common, "-o", f"output_dir={split}", background=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (split / "checkpoints").is_dir() and any(p.name.isdigit() for p in (split / "checkpoints").iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (split / "model").exists()
    r = _sdjax("train", TINY, *common, "-o", f"output_dir={split}")
    assert r.returncode == 0, r.stderr
    assert "resumed from checkpoint at step" in r.stderr
    assert _losses(split) == losses  # the same run, loss for loss
    assert (split / "model" / "model_index.json").is_file()


@pytest.mark.slow
def test_lora_run_writes_kohya_file(mini_model, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "lora"
    r = _sdjax("train", TINY, "-o", f"model={mini_model}", "-o", f"output_dir={out}", "-o", "max_steps=2",
               "-o", "lora_rank=4", "-o", '["attn", "text_encoder:attn"]'.join(("lora_targets=", "")),
               "-o", "ema_decay=null", "--no-progress", "--export-dtype", "float16")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path == out / "lora.safetensors"
    with safe_open(str(path), "np") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_network_dim"] == "4"
        assert f.get_tensor(keys[0]).dtype == np.float16
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v") for k in keys)
