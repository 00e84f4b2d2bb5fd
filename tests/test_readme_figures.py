"""Every benchmark table and speed / memory figure in README.md comes from a committed
`bench_results/` file (issue #22).

- Benchmark outputs (untagged fenced blocks in the Accelerators, Running on many devices and
  Benchmarks sections; a block tagged ```bash or ```python is code), and markdown
  tables titled with the GPU benchmark's "sdjax vs diffusers on ..." line) are verbatim copies:
  each of their non-blank lines appears verbatim, in the block's order, in one bench_results
  file (an excerpt may leave rows out).
- Figures in the prose and summary tables of those sections (numbers with a time, memory, rate,
  percent or ratio unit) must appear in a bench_results file (possibly rounded to the README's
  precision), or, for ratios and percentages, be the quotient of two figures of the same README
  line. Figures with no committed output are listed
  in UNBACKED with their README text; the test fails when a new unbacked figure appears, and
  when a listed one is gone (so the list shrinks as outputs are committed or sentences edited).
"""

import gzip
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench_results"
SECTIONS = ("Accelerators", "Running on many devices", "Benchmarks")

# Figures of those sections without a committed output: (figure as the README writes it, a few
# words of its sentence). Empty: every figure is backed; an entry is only for a figure reported
# as unbacked in an issue, until its output is committed or the sentence edited.
UNBACKED: set[tuple[str, str]] = set()

_NUM = r"[-+]?\d+(?:\.\d+)?"
_UNIT = r"(?:x|%|/255|ms|us|s|min|GiB|GB|MB|GFLOP/s|TFLOP/s|images/s)"
# A figure: a number (or a range a-b) followed by a unit, or a decimal number before "/" or
# ")" in a list of timings ("3.19 / 13.3 s"), not part of a word, version or size like 64x64.
FIGURE = re.compile(rf"(?<![\w.\-/])({_NUM}(?:-{_NUM})?)(?:\s?({_UNIT}))?(?![\w.]|x\d)")


def sections(text: str) -> dict[str, list[tuple[int, str]]]:
    """{section title: [(line number, line)]} for the `## ` sections."""
    out, name = {}, None
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            name = line[3:].strip()
            out[name] = []
        elif name is not None:
            out[name].append((i, line))
    return out


def _wanted():
    """The lines of the README sections this test reads."""
    return [(i, line) for title, ls in sections(README.read_text()).items()
            if title.startswith(SECTIONS) for i, line in ls]


@cache
def result_lines() -> dict[str, list[str]]:
    """Every committed text output (gzipped ones too), by file name, as rstripped lines."""
    files = {}
    for p in sorted(RESULTS.iterdir()):
        if p.suffix == ".gz":
            if "trace" in p.name:  # a profiler trace: events, not a report
                continue
            text = gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
        elif p.suffix in (".txt", ".md", ".log", ".json"):
            text = p.read_text()
        else:
            continue
        files[p.name] = [line.rstrip() for line in text.splitlines()]
    return files


def output_blocks() -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each benchmark output in the sections: fenced blocks that
    are not commands, and GPU markdown tables with their title line."""
    lines = _wanted()
    blocks, i = [], 0
    while i < len(lines):
        n, line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while not lines[j][1].startswith("```"):
                j += 1
            body = [ln.rstrip() for _, ln in lines[i + 1:j]]
            code = line.strip() != "```"  # ```bash, ```python: code, not an output
            if body and not code and not body[0].startswith(("python ", "sdjax ", "$ ")):
                blocks.append((n + 1, body))
            i = j + 1
            continue
        if line.startswith("sdjax vs diffusers on "):  # the GPU benchmark's table title
            j = i + 1
            while j < len(lines) and (not lines[j][1].strip() or lines[j][1].startswith("|")):
                if not lines[j][1].strip() and j > i + 1 and lines[j - 1][1].startswith("|"):
                    break
                j += 1
            blocks.append((n, [ln.rstrip() for _, ln in lines[i:j]]))
            i = j
            continue
        i += 1
    return blocks


def verbatim_source(block: list[str]) -> str | None:
    """The bench_results file holding every non-blank line of `block`, each verbatim and in the
    block's order (a block may leave rows out, as the flops excerpt does), or None."""
    wanted = [line for line in block if line.strip()]
    for name, file_lines in result_lines().items():
        pos = 0
        for line in wanted:
            try:
                pos = file_lines.index(line, pos) + 1
            except ValueError:
                break
        else:
            return name
    return None


def test_benchmark_outputs_in_the_readme_are_verbatim_bench_results():
    blocks = output_blocks()
    assert len(blocks) >= 4, "the README's benchmark outputs were not found (section names changed?)"
    missing = [f"README.md:{n}: {body[0][:80]!r}" for n, body in blocks if verbatim_source(body) is None]
    assert not missing, "benchmark output not found verbatim in bench_results/:\n" + "\n".join(missing)


def test_verbatim_check_catches_an_edited_number():
    n, body = next((n, b) for n, b in output_blocks() if len(b) > 5)
    row = next(k for k, line in enumerate(body) if re.search(r"\d\.\d", line))
    edited = list(body)
    edited[row] = re.sub(r"(\d)\.(\d)", lambda m: f"{m[1]}.{(int(m[2]) + 1) % 10}", edited[row], count=1)
    assert verbatim_source(body) is not None and verbatim_source(edited) is None


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+(?:\.\d+)?", text)


_UNIT_IN_LINE = re.compile(r"(?<![A-Za-z])(ms|us|s|min|GiB|GB|MB|GFLOP/s|TFLOP/s|images/s)(?![A-Za-z])|(%|/255)")


def _unit_key(unit: str | None) -> str | None:
    return {"GB": "GiB", "MB": "GiB"}.get(unit, unit)


@cache
def _file_numbers() -> dict[str | None, set[str]]:
    """Numbers of the text outputs (not the JSON twins: more digits, more coincidences), by the
    units their line carries: a figure in seconds is only matched by a number on a line in seconds."""
    by_unit: dict[str | None, set[str]] = {}
    for name, lines in result_lines().items():
        if name.endswith(".json"):
            continue
        for line in lines:
            units = {_unit_key(a or b) for a, b in _UNIT_IN_LINE.findall(line)}
            for unit in units:
                by_unit.setdefault(unit, set()).update(_numbers(line))
            by_unit.setdefault("x", set()).update(re.findall(r"(\d+(?:\.\d+)?)x(?![\w])", line))
    return by_unit


def _rounds_to(value: str, candidates) -> bool:
    decimals = len(value.split(".")[1]) if "." in value else 0
    target = f"{float(value):.{decimals}f}"
    return any(f"{float(c):.{decimals}f}" == target for c in candidates)


def _ratio_of(value: float, numbers: list[float], percent: bool, decimals: int) -> bool:
    scale = 100.0 if percent else 1.0
    for a in numbers:
        for b in numbers:
            if b and a != b and f"{scale * a / b:.{decimals}f}" == f"{value:.{decimals}f}":
                return True
    return False


def figure_backed(fig: str, unit: str | None, line: str) -> bool:
    """`fig` (a number or a range a-b) with `unit` is in a bench_results line of that unit
    (rounded to the README's digits; ratios as "1.07x" tokens), or is a ratio / percentage of
    two numbers of its README line (whose own figures are checked too)."""
    pool = _file_numbers().get(_unit_key(unit), set())
    for part in [p for p in re.split(r"(?<=\d)-", fig.lstrip("+-")) if p]:
        decimals = len(part.split(".")[1]) if "." in part else 0
        if _rounds_to(part, pool):
            continue
        if unit in ("x", "%"):  # a quotient of two figures quoted beside it ("1.84x ... 36.9 vs 67.9 ms")
            same_line = [float(x) for x in _numbers(line) if x != part]
            if _ratio_of(float(part), same_line, unit == "%", decimals):
                continue
        return False
    return True


def readme_figures() -> list[tuple[int, str, str | None, str]]:
    """(line number, figure, unit, line) for prose and summary-table figures of the sections
    (benchmark output blocks excluded: they are checked verbatim)."""
    skip = set()
    for n, body in output_blocks():
        skip.update(range(n - 1, n + len(body) + 1))
    out, in_fence = [], False
    lines = _wanted()
    following = {n: lines[k + 1][1] if k + 1 < len(lines) else "" for k, (n, _) in enumerate(lines)}
    for n, line in lines:
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence or n in skip:
            continue
        text = re.sub(r"`[^`]*`", " ", line)  # code: flags, paths, names
        if text.startswith("|"):  # a summary table: targets (cells with <= / >=) are not results
            text = "|".join(c for c in text.split("|") if "<=" not in c and ">=" not in c)
        text = re.sub(r"guidance \d+(?:\.\d+)?|cfg \d+", " ", text)
        text = re.sub(r"\d{4}-\d{2}-\d{2}|#\d+|\d+x\d+|\d+(?:\.\d+){2,}|\bSD \d\.\d|issue \d+", " ", text)
        found = list(FIGURE.finditer(text))
        for k, m in enumerate(found):
            fig, unit = m.group(1), m.group(2)
            if unit is None and "." not in fig and "-" not in fig.lstrip("+-"):
                continue  # a bare integer: a count, a size, a step number
            if unit is None and not re.match(r"\s*(?:/|\)|,|;|vs|GFLOP|TFLOP)", text[m.end():]):
                continue
            shown = fig + (unit if unit in ("x", "%") else f" {unit}" if unit else "")
            if unit is None:  # "3.19 / 13.3 s": the unit of the next figure with one, else the last
                unit = next((f.group(2) for f in found[k + 1:] if f.group(2)), None) or \
                    next((f.group(2) for f in reversed(found[:k]) if f.group(2)), None)
            out.append((n, shown, unit, line + " " + following[n]))  # a sentence may wrap
    return out


def test_readme_figures_come_from_bench_results():
    unbacked, known_seen = [], set()
    known = {f for f, _ in UNBACKED}
    for n, fig, unit, line in readme_figures():
        if figure_backed(fig.split()[0].rstrip("x%"), unit, line):
            continue
        if fig in known:
            known_seen.add(fig)
            continue
        unbacked.append(f"README.md:{n}: {fig!r} in {line.strip()[:100]!r}")
    assert not unbacked, ("figures in README.md with no committed bench_results/ output (commit the output, "
                          "or list them in UNBACKED and in the issue):\n" + "\n".join(unbacked))
    stale = sorted(known - known_seen)
    assert not stale, f"UNBACKED lists figures the README no longer has unbacked: {stale}"
