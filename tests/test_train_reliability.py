"""Training refuses bad numbers, stops at the first non-finite loss keeping the last good
checkpoint, never exports NaN weights, and a failed fresh run leaves no folder (issue #21)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cli_run
from sdjax.errors import ConfigError
from sdjax.train.config import TrainConfig
from test_train import MINI_SPEC

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune_tiny.json"


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    from sdjax.data.tokenizer import train_tokenizer
    from sdjax.train.init import init_pipeline_folder

    root = tmp_path_factory.mktemp("mini_rel")
    return init_pipeline_folder(root / "model", MINI_SPEC, train_tokenizer(root / "tok"), seed=0)


@pytest.mark.parametrize("kw,needle", [
    (dict(learning_rate=math.nan), "learning_rate=nan: must be a finite"),
    (dict(learning_rate=math.inf), "learning_rate=inf: must be a finite"),
    (dict(learning_rate=-1e-4), "learning_rate=-0.0001: must be a finite number > 0"),
    (dict(learning_rate=0), "learning_rate=0"),
    (dict(max_steps="abc"), "max_steps='abc': must be a whole number"),
    (dict(batch_size=2.5), "batch_size=2.5: must be a whole number"),
    (dict(ema_decay="x"), "ema_decay='x': must be a number"),
    (dict(gradient_checkpointing="yes"), "gradient_checkpointing='yes': must be true or false"),
    (dict(sample_prompts=("a", 3)), "sample_prompts"),
])
def test_config_types_and_learning_rate(kw, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig(model="m", data="d", output_dir="o", **kw)
    assert needle in str(e.value)


@pytest.mark.parametrize("override,needle", [("learning_rate=NaN", "learning_rate=nan"),
                                             ("learning_rate=-1", "learning_rate=-1"),
                                             ("max_steps=abc", "max_steps='abc'")])
def test_cli_bad_training_numbers_exit_2_and_leave_no_folder(tmp_path, capsys, override, needle):
    out = tmp_path / "o"
    args = ["train", str(TINY), "-o", f"model={tmp_path}", "-o", f"output_dir={out}", "-o", override]
    if override.startswith("learning_rate=NaN"):  # the real script once; the others through sdjax.cli.main
        r = subprocess.run([sys.executable, "-m", "sdjax.cli", *args], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ), timeout=300)
    else:
        r = cli_run(capsys, *args)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_non_finite_loss_stops_keeping_last_good_checkpoint(mini_model, tmp_path):
    from sdjax.train.trainer import NonFiniteLossError, Trainer

    cfg = TrainConfig(model=str(mini_model), data="synthetic:0:64", output_dir=str(tmp_path / "run"),
                      resolution=32, batch_size=2, max_steps=8, learning_rate=1e30, checkpoint_every=1,
                      log_every=1, max_grad_norm=1e30)
    trainer = Trainer(cfg, log=lambda m: None)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint") as e:
        trainer.run(progress=False)
    stopped = trainer.step
    assert 1 < stopped < 8 and f"step {stopped}:" in str(e.value)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == stopped - 1  # the bad step's state is never saved
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == stopped - 1 and np.all(np.isfinite(losses))
    # The weights after 1e30-sized updates, made NaN: export refuses them and writes nothing.
    trainer.state = {**trainer.state, "params": jax.tree.map(lambda a: a * jnp.nan, trainer.state["params"])}
    with pytest.raises(NonFiniteLossError, match="refusing to export"):
        trainer.export(tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_run_failing_after_it_made_its_folder_leaves_nothing(mini_model, tmp_path, capsys):
    # The model loads and the trainer creates output_dir; the data folder is missing, so the
    # run fails before its first checkpoint: the folder it made must be gone again. (sdjax.cli.main
    # in this process: what is left is decided by the run, not the process.)
    out = tmp_path / "run"
    r = cli_run(capsys, "train", TINY, "-o", f"model={mini_model}", "-o", f"data={tmp_path / 'no_such_data'}",
                "-o", f"output_dir={out}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no_such_data" in r.stderr
    assert not out.exists()
    # An output_dir that existed before the run is the user's: it stays.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli_run(capsys, "train", TINY, "-o", f"model={mini_model}", "-o", f"data={tmp_path / 'no_such_data'}",
                "-o", f"output_dir={out}")
    assert r.returncode == 2 and (out / "notes.txt").read_text() == "mine"
