"""Every shell command and Python snippet in README.md runs (or is listed here with the reason
it cannot run in CI, and then checked for syntax and for flags the CLI really has).

How README blocks are run:
- ```bash blocks: split into commands (backslash continuations joined, comments dropped, `&&`
  chains split); the runnable ones (all `sdjax ...`) run in README order in one sandbox folder,
  in one subprocess through `sdjax.cli.main`, which the `sdjax` script calls (a later command
  may read an earlier one's output, e.g. `red_circle.png`), and each must exit 0.
- ```python blocks: executed in README order in one namespace, in this process (so a later
  block may use `pipe` from an earlier one), with PRELUDE defining the arrays that the API
  overview leaves abstract (`latents_nhwc`, `timesteps`, `images_nhwc`).

Placeholders become real files in the sandbox (PLACEHOLDERS, made by `_sandbox`):
  path/to/stable-diffusion-v1-5        the docs model (below), a diffusers folder
  path/to/lora.safetensors             a kohya LoRA for it (random factors, sdjax.train.lora)
  path/to/loras/my_style.safetensors   the same LoRA, for the <lora:my_style:M> tag
  path/to/my-embedding.safetensors     a textual-inversion embedding (2 random vectors)
  path/to/controlnet                   a ControlNet folder made from its UNet (diffusers.from_unet)
  house.png, mask.png, prompts.txt     a shapes image, a right-half mask, three prompts
  configs/, sdjax/assets/tiny          links to the repository's configs/ and the docs model
The docs model is the embedded model (sdjax/assets/tiny); until it ships, a random model of
its architecture (`test_notebooks.docs_model_folder`), and then generation commands that
rely on the embedded default get `--model <that folder>` appended (and `sdjax.cli.
EMBEDDED_MODEL` points there for Python blocks).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from test_notebooks import docs_model_folder
from conftest import FAST_COMPILE_FLAGS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SDJAX = str(Path(sys.executable).with_name("sdjax"))
GENERATION = ("generate", "img2img", "inpaint", "outpaint")

# Commands that cannot run in CI: (regex searched in the command, reason).
NOT_RUN = [
    (r"^python3 -m venv \.venv$", "creates a virtualenv; CI already runs inside one (.ci/run)"),
    (r"^\. \.venv/bin/activate$", "activates that virtualenv"),
    (r"^pip install ", "installs the repository or JAX wheels; CI installed them once (.ci/run)"),
    (r"^python -m pytest ", "the test suite itself; .ci/run runs this line verbatim"),
    (r"^gcloud ", "needs Google Cloud credentials and TPUs"),
    (r"path/to/model\.safetensors", "needs a full-size SD single file (a tiny model's single file "
                                     "needs config_dir, which the CLI does not take)"),
    (r"--num-processes P --process-id i", "needs P hosts (tests/test_multihost.py runs 2 processes)"),
    (r"--taesd models/taesd", "needs the published TAESD weights (no downloads in CI); tests/test_preview.py "
                              "runs the same flags on a random AutoencoderTiny folder"),
    (r"^sdjax serve ", "a server runs until stopped (tests/test_serve*.py start real ones)"),
    (r"stable-diffusion-xl-", "needs the published SDXL weights (no downloads in CI); tests/test_sdxl_pipeline.py "
                              "and tests/test_cli_sdxl.py run the same flags on tiny random SDXL folders"),
]
PRELUDE = """
import numpy as _np
_u = pipe.unet.config
_size = _u.sample_size
latents_nhwc = _np.random.default_rng(0).standard_normal((1, _size, _size, _u.in_channels)).astype(_np.float32)
timesteps = _np.array([500], _np.int32)
images_nhwc = _np.zeros((1, 8 * _size, 8 * _size, 3), _np.float32)
"""


# ---- parsing -------------------------------------------------------------------------------


def readme_blocks(text: str | None = None) -> list[tuple[str, str, int]]:
    """Fenced blocks as (language, code, line number of the opening fence)."""
    text = README.read_text() if text is None else text
    blocks, lang, start, lines = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if lang is None and line.startswith("```"):
            lang, start, lines = line[3:].strip(), i, []
        elif lang is not None and line.startswith("```"):
            blocks.append((lang, "\n".join(lines), start))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"README.md: the block opened at line {start} is never closed"
    return blocks


def bash_commands(code: str) -> list[str]:
    """Commands of a bash block: continuations joined, comments dropped, `&&` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out += _split_and(line)
    return out


def _split_and(line: str) -> list[str]:
    """Split at `&&` outside quotes."""
    parts, quote, start, i = [], None, 0, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("&&", i):
            parts.append(line[start:i].strip())
            start = i = i + 2
            continue
        i += 1
    return parts + [line[start:].strip()]


def not_run_reason(command: str) -> str | None:
    return next((reason for pattern, reason in NOT_RUN if re.search(pattern, command)), None)


def sdjax_invocations(command: str) -> list[tuple[str, list[str]]]:
    """(subcommand, --flags) of every `sdjax SUB ...` in a command, also inside quoted arguments
    (`gcloud ... --command "sdjax generate ..."`)."""
    found = []
    tokens = shlex.split(command)
    if tokens and (tokens[0] == "sdjax" or tokens[0].endswith("/sdjax")) and len(tokens) > 1:
        flags = [t.split("=")[0] for t in tokens[2:] if t.startswith("--")]
        return [(tokens[1], flags)]
    for tok in tokens:
        if " " in tok and "sdjax " in tok:
            for inner in _split_and(tok):
                found += sdjax_invocations(inner)
    return found


@cache
def cli_flags(sub: str) -> frozenset:
    """The flags `sdjax SUB --help` lists, from the parser `sdjax.cli.main` uses (in this process:
    a subprocess per subcommand cost a Python and JAX start each)."""
    import contextlib
    import io

    from sdjax import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args([sub, "--help"])
    assert exit_.value.code == 0, f"`sdjax {sub} --help` failed"
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", out.getvalue()))


def all_commands():
    return [(cmd, line) for lang, code, line in readme_blocks() if lang == "bash" for cmd in bash_commands(code)]


# ---- fast checks ---------------------------------------------------------------------------


def test_readme_has_the_sections_issue_10_asks_for():
    text = README.read_text()
    for heading in ("## Quickstart", "## Features", "## CLI reference", "## Python API",
                    "## Bring your own weights", "TPU VM", "## Running on many devices and hosts",
                    "## Benchmarks", "## Known limits"):
        assert heading in text, heading
    langs = {lang for lang, _, _ in readme_blocks()}
    assert {"bash", "python"} <= langs


def test_quickstart_test_command_is_what_ci_runs():
    # The README's command is .ci/run's first command (after `set`, `cd` and the system
    # packages: `command -v X || .ci/apt-install X`); the oldest-jax job follows it.
    lines = [s.strip() for s in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = next(s for s in lines if s and not s.startswith(("#", "set ", "cd ", "command -v ")))
    bash = [code.strip() for lang, code, _ in readme_blocks() if lang == "bash"]
    assert ci in bash, ".ci/run's command and the README Quickstart test command differ"
    first = bash[0]
    assert "pip install ." in first and re.search(r"sdjax generate .*--out \S+\.png$", first), \
        "the first Quickstart command installs sdjax and generates an image"


def test_bash_blocks_are_valid_shell():
    for lang, code, line in readme_blocks():
        if lang == "bash":
            out = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
            assert out.returncode == 0, f"README.md line {line}: {out.stderr}"


def test_python_blocks_compile():
    for lang, code, line in readme_blocks():
        if lang == "python":
            compile(code, f"README.md:{line}", "exec")


def test_every_sdjax_flag_in_the_readme_exists():
    """Runnable or not, each `sdjax SUB --flag` names a real subcommand and flag."""
    seen = 0
    for cmd, line in all_commands():
        for sub, flags in sdjax_invocations(cmd):
            known = cli_flags(sub)
            missing = [f for f in flags if f not in known]
            assert not missing, f"README.md line {line}: `sdjax {sub}` has no {missing}: {cmd}"
            seen += 1
    assert seen >= 10


def test_not_run_list_matches_the_readme():
    """Each NOT_RUN entry is used by some README command (no stale excuses)."""
    commands = [cmd for cmd, _ in all_commands()]
    for pattern, reason in NOT_RUN:
        assert any(re.search(pattern, c) for c in commands), f"NOT_RUN {pattern!r} matches nothing"
    runnable = [c for c in commands if not_run_reason(c) is None]
    assert runnable and all(c.startswith("sdjax ") for c in runnable), \
        [c for c in runnable if not c.startswith("sdjax ")]


# ---- running them --------------------------------------------------------------------------


def _write_lora(model: Path, path: Path) -> None:
    import jax

    import sdjax
    from sdjax.train import lora

    pipe = sdjax.load_pipeline(model)
    states = {"unet": pipe.unet.state, "text_encoder": pipe.text_encoder.state}
    spec = lora.make_spec(states, ("to_q", "to_k", "to_v", "to_out.0"), rank=2)
    params = lora.init_params(spec, states, jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
    lora.save_kohya(path, spec, jax.device_get(params))


def _write_controlnet(model: Path, path: Path) -> None:
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(model / "unet"))
    diffusers.ControlNetModel.from_unet(unet).save_pretrained(str(path))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder where README commands find every placeholder (see the module docstring)."""
    from safetensors.numpy import save_file

    from sdjax.data.synthetic import DEFAULT_CONFIG, sample

    box = tmp_path_factory.mktemp("readme")
    model = docs_model_folder(tmp_path_factory.mktemp("docs-model") / "tiny").resolve()
    (box / "path" / "to" / "loras").mkdir(parents=True)
    (box / "path" / "to" / "stable-diffusion-v1-5").symlink_to(model)
    (box / "configs").symlink_to(ROOT / "configs")
    (box / "sdjax" / "assets").mkdir(parents=True)
    (box / "sdjax" / "assets" / "tiny").symlink_to(model)
    _write_lora(model, box / "path" / "to" / "lora.safetensors")
    shutil.copy(box / "path" / "to" / "lora.safetensors", box / "path" / "to" / "loras" / "my_style.safetensors")
    width = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    vectors = np.random.default_rng(0).standard_normal((2, width)).astype(np.float32) * 0.01
    save_file({"emb_params": vectors}, str(box / "path" / "to" / "my-embedding.safetensors"))
    _write_controlnet(model, box / "path" / "to" / "controlnet")
    image = sample(0, 0, "train", DEFAULT_CONFIG)[0]
    image.save(box / "house.png")
    from PIL import Image

    mask = Image.new("L", image.size, 0)
    mask.paste(255, (image.width // 2, 0, image.width, image.height))
    mask.save(box / "mask.png")
    (box / "prompts.txt").write_text("a red circle on a blue background\na green square\na yellow triangle\n")
    return box, model


def _with_model(command: str, model: Path) -> str:
    """Until the embedded model ships, point default-model generation commands at the docs model."""
    from sdjax.cli import EMBEDDED_MODEL

    if model == EMBEDDED_MODEL:
        return command
    if any(sub in GENERATION and "--model" not in flags for sub, flags in sdjax_invocations(command)):
        return f"{command} --model {shlex.quote(str(model))}"
    return command


# Runs README commands, one `sdjax ...` line per line of stdin, through `sdjax.cli.main` (what the
# `sdjax` script calls) in this one process: the README's commands as users type them, without
# paying Python's and JAX's start-up and a cache load for each. Prints "RC <line> <status>
# <seconds>s" after each and stops at the first non-zero status. Run with `python -P` (as the
# script runs): the sandbox's own sdjax/assets folder must not shadow the package.
RUNNER = """
import shlex, sys, time
from sdjax import cli
for text in sys.stdin.read().splitlines():
    line, command = text.split(" ", 1)
    argv = shlex.split(command, comments=True)
    assert argv[0] == "sdjax", argv
    print(f"RUN {line} {command}", flush=True)
    start = time.time()
    status = cli.main(argv[1:])
    print(f"RC {line} {status} {time.time() - start:.1f}s", flush=True)
    if status:
        sys.exit(status)
"""


@pytest.mark.slow
def test_readme_shell_commands_run(sandbox):
    box, model = sandbox
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}",  # for --devices 8 --fsdp 8
               PATH=f"{Path(SDJAX).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    commands = [(_with_model(cmd, model), line) for cmd, line in all_commands() if not not_run_reason(cmd)]
    assert len(commands) >= 10 and all(c.startswith("sdjax ") and "\n" not in c for c, _ in commands)
    out = subprocess.run([sys.executable, "-P", "-c", RUNNER], cwd=box, env=env, capture_output=True, text=True,
                         timeout=1500, input="".join(f"{line} {cmd}\n" for cmd, line in commands))
    statuses = re.findall(r"^RC (\d+) (\S+) \S+s$", out.stdout, flags=re.M)
    ran = len(statuses)
    print("\n".join(re.findall(r"^RC .*$", out.stdout, flags=re.M)))  # per-command seconds, shown by -rP
    # The failing command: the one whose status is not 0, or the one after the last reported.
    failed = next((i for i, (_, status) in enumerate(statuses) if status != "0"), ran)
    cmd, line = commands[min(failed, len(commands) - 1)]
    assert out.returncode == 0 and ran == len(commands) and failed == ran, \
        f"README.md line {line}: `{cmd}` failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    for cmd, line in commands:
        png = re.search(r"--out (\S+\.png)\b", cmd)
        if png:
            assert (box / png.group(1)).is_file(), f"README.md line {line}: no {png.group(1)}"


# Python blocks that need published weights CI does not have (the same calls run on tiny random
# models in the named tests); each pattern must match some README block.
PYTHON_NOT_RUN = {r"stable-diffusion-xl-": "tests/test_sdxl_pipeline.py (base + refiner, size conditioning)"}


def test_python_not_run_entries_are_used():
    blocks = [code for lang, code, _ in readme_blocks() if lang == "python"]
    for pattern in PYTHON_NOT_RUN:
        assert any(re.search(pattern, code) for code in blocks), f"PYTHON_NOT_RUN {pattern!r} matches nothing"


@pytest.mark.slow
def test_readme_python_snippets_run(sandbox, monkeypatch):
    import sdjax.cli

    box, model = sandbox
    monkeypatch.chdir(box)
    monkeypatch.setattr(sdjax.cli, "EMBEDDED_MODEL", model)
    namespace: dict = {"__name__": "__readme__"}
    blocks = [(code, line) for lang, code, line in readme_blocks() if lang == "python"]
    assert len(blocks) >= 5
    for code, line in blocks:
        if any(re.search(pattern, code) for pattern in PYTHON_NOT_RUN):
            continue
        if "latents_nhwc" in code and "latents_nhwc" not in namespace and "pipe" in namespace:
            exec(PRELUDE, namespace)
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README.md python block at line {line} failed: {e!r}") from e
        if "latents_nhwc" in code:  # the loading block replaced `pipe`: shapes for the next one
            exec(PRELUDE, namespace)
    assert (box / "circle.png").is_file() and (box / "runs" / "my_lora" / "lora.safetensors").is_file()
