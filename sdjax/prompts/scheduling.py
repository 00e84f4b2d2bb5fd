"""AUTOMATIC1111 prompt editing, alternation and composable `AND`, as its `prompt_parser.py` reads them.

A1111 parses a prompt with a lark grammar (`schedule_parser`); this is a recursive-descent
parser for the same grammar, with backtracking where lark's Earley parser would try another
reading:

    start:      (prompt | /[][():]/+)*           stray brackets and colons are text at top level
    prompt:     (emphasized | scheduled | alternate | plain | WHITESPACE)*
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"   (kept as text)
    scheduled:  "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
    alternate:  "[" prompt ("|" [prompt])+ "]"
    plain:      /([^\\\\\\[\\]():|]|\\\\.)+/       an escape `\\x` stays in the text (the emphasis
                                                parser reads it later)

A prompt the grammar rejects (a `|` outside an alternation, a trailing backslash) is used
unchanged for every step, as A1111 does. `[from:to:when]` shows `from` while the step is
<= when, then `to`; `[to:when]` and `[from::when]` leave the other side empty. `when` with a
decimal point is a fraction of the steps, without one a step number (A1111's default; its
"old prompt editing timelines" option, `old_scheduling=True`: below 1 a fraction, else a
step). For the hires-fix pass A1111 counts on: a step number `N` means step `N - base steps`
of the second pass and a fraction `f` means `(f - 1) * hires steps` (`hires_steps=`).
`[a|b|c]` cycles a, b, c, a, ... one per step. Editing and alternation nest.

`get_schedules` returns A1111's `[[end_at_step, text], ...]`; during sampling, 0-based step
k uses the first entry with k <= end_at_step (A1111's `reconstruct_cond_batch`).
`split_and` is A1111's composable-diffusion split: `a cat :1.2 AND a dog :0.8`.
`plan_conditioning` turns a batch of prompts into a table of distinct texts and the per-step
indices the compiled sampler looks up (`sdjax.pipeline.core`). Pure Python and numpy.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["ConditioningPlan", "bucket", "get_schedules", "plan_conditioning", "prompt_schedule",
           "split_and", "step_indices"]

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"  # lark's common.SIGNED_NUMBER
_WHEN = re.compile(r"\s*(" + _NUMBER + r")\s*\]")
_SPECIAL = set("\\[]():|")
_TOP_LITERAL = set("[]():")


@dataclasses.dataclass
class _Scheduled:
    before: list | None
    after: list
    when: str


@dataclasses.dataclass
class _Alternate:
    options: list


class _Reject(Exception):
    """The grammar does not accept the prompt (A1111 then uses it unchanged)."""


def _plain(s: str, pos: int) -> int:
    """End of the run of plain characters (and `\\x` escapes) starting at pos."""
    n = len(s)
    while pos < n:
        c = s[pos]
        if c == "\\":
            if pos + 1 < n and s[pos + 1] != "\n":  # lark's `.` does not match a newline
                pos += 2
                continue
            break
        if c in _SPECIAL:
            break
        pos += 1
    return pos


def _prompt(s: str, pos: int) -> tuple[list, int]:
    """The longest `prompt` from pos: (nodes, end). Never fails; may be empty."""
    out: list = []
    while pos < len(s):
        c = s[pos]
        if c == "(":
            r = _round(s, pos)
        elif c == "[":
            r = _square(s, pos)
        else:
            end = _plain(s, pos)
            if end == pos:
                break
            out.append(s[pos:end])
            pos = end
            continue
        if r is None:
            break
        out.extend(r[0])
        pos = r[1]
    return out, pos


def _round(s: str, pos: int):
    first, q = _prompt(s, pos + 1)
    if q < len(s) and s[q] == ")":
        return ["(", *first, ")"], q + 1
    if q < len(s) and s[q] == ":":
        second, r = _prompt(s, q + 1)
        if r < len(s) and s[r] == ")":
            return ["(", *first, ":", *second, ")"], r + 1
    return None


def _square(s: str, pos: int):
    first, q = _prompt(s, pos + 1)
    if q >= len(s):
        return None
    c = s[q]
    if c == "]":
        return ["[", *first, "]"], q + 1
    if c == "|":
        options = [first]
        while q < len(s) and s[q] == "|":
            option, q = _prompt(s, q + 1)
            options.append(option)
        if q < len(s) and s[q] == "]":
            return [_Alternate(options)], q + 1
        return None
    if c == ":":
        m = _WHEN.match(s, q + 1)
        if m:
            return [_Scheduled(None, first, m.group(1))], m.end()
        second, r = _prompt(s, q + 1)
        if r < len(s) and s[r] == ":":
            m = _WHEN.match(s, r + 1)
            if m:
                return [_Scheduled(first, second, m.group(1))], m.end()
    return None


def _parse(s: str) -> list:
    """The `start` rule: structures where they parse, stray `[ ] ( ) :` as text; else _Reject."""
    out: list = []
    pos = 0
    while pos < len(s):
        c = s[pos]
        r = _round(s, pos) if c == "(" else _square(s, pos) if c == "[" else None
        if r is not None:
            out.extend(r[0])
            pos = r[1]
        elif c in _TOP_LITERAL:
            out.append(c)
            pos += 1
        else:
            nodes, end = _prompt(s, pos)
            if end == pos:
                raise _Reject(f"unexpected {c!r} at {pos}")
            out.extend(nodes)
            pos = end
    return out


def _walk(nodes):
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _text_at(step: int, nodes, whens: dict) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            parts.append(_text_at(step, (node.before or []) if step <= whens[id(node)] else node.after, whens))
        else:
            parts.append(_text_at(step, node.options[(step - 1) % len(node.options)], whens))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None,
                    old_scheduling: bool = False) -> list[list]:
    """A1111's schedule of one prompt: [[end_at_step, text], ...], end steps increasing, the last
    one = steps (hires_steps for a hires pass). See the module docstring for `when`."""
    if hires_steps is None or old_scheduling:
        int_offset, flt_offset, total = 0, 0.0, int(steps)
    else:
        int_offset, flt_offset, total = int(steps), 1.0, int(hires_steps)
    try:
        tree = _parse(prompt)
    except _Reject:
        return [[total, prompt]]
    ends = {total}
    whens = {}
    for node in _walk(tree):
        if isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
            continue
        v = float(node.when)
        if old_scheduling:
            v = v * total if v < 1 else v
        elif "." in node.when:
            v = (v - flt_offset) * total
        else:
            v = v - int_offset
        when = min(total, int(v))
        whens[id(node)] = when
        if when >= 1:
            ends.add(when)
    return [[t, _text_at(t, tree, whens)] for t in sorted(ends)]


def get_schedules(prompts: Sequence[str], steps: int, hires_steps: int | None = None,
                  old_scheduling: bool = False) -> list[list[list]]:
    """A1111's `get_learned_conditioning_prompt_schedules`: one `prompt_schedule` per prompt."""
    return [prompt_schedule(p, steps, hires_steps, old_scheduling) for p in prompts]


_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable diffusion (A1111 `get_multicond_prompt_list`): the sub-prompts between `AND`s
    with their weights, `"a cat :1.2 AND a dog"` -> [("a cat", 1.2), (" a dog", 1.0)]."""
    out = []
    for sub in _AND.split(prompt):
        m = _WEIGHT.search(sub)
        text, weight = m.groups() if m is not None else (sub, None)
        out.append((text, 1.0 if weight is None else float(weight)))
    return out


def step_indices(schedule: list[list], steps: int) -> np.ndarray:
    """int32 (steps,): for each 0-based sampling step k, the index of the schedule entry in use
    (the first with k <= end_at_step; the first entry if none, as A1111)."""
    ends = [e for e, _ in schedule]
    out = np.zeros(steps, np.int32)
    for k in range(steps):
        out[k] = next((j for j, e in enumerate(ends) if k <= e), 0)
    return out


def bucket(n: int, minimum: int = 8) -> int:
    """The padded size for n items: the smallest power of two >= max(n, minimum), so the
    compiled shapes change only when a batch needs twice as many conditionings."""
    size = minimum
    while size < n:
        size *= 2
    return size


class ConditioningPlan(NamedTuple):
    """A batch's conditionings as a table and per-step lookups.

    texts: the distinct texts to encode (table row j = texts[j]); cond_index: int32
    (B, steps, S) the row of sub-prompt s of image b at step k; uncond_index: int32 (B, steps);
    weights: float32 (B, S) the AND weights, 0 for padding sub-prompts. S = `bucket(max
    sub-prompts, 1)`, a power of two (1 without AND).
    """

    texts: list[str]
    cond_index: np.ndarray
    uncond_index: np.ndarray
    weights: np.ndarray


def plan_conditioning(prompts: Sequence[str], negatives: Sequence[str], steps: int, *,
                      hires_steps: int | None = None, old_scheduling: bool = False) -> ConditioningPlan:
    """A1111's conditioning of a batch: prompts split at AND (each part scheduled on its own,
    `get_multicond_learned_conditioning`), negative prompts scheduled without AND splitting.
    steps: the pass's step count (the schedule is read at 0-based steps 0..steps-1)."""
    texts: dict[str, int] = {}
    run_steps = int(hires_steps if hires_steps is not None else steps)

    def rows(prompt: str) -> np.ndarray:
        schedule = prompt_schedule(prompt, steps, hires_steps, old_scheduling)
        ids = np.asarray([texts.setdefault(text, len(texts)) for _, text in schedule], np.int32)
        return ids[step_indices(schedule, run_steps)]

    parts = [split_and(p) for p in prompts]
    s = bucket(max(len(p) for p in parts), 1)
    b = len(prompts)
    cond_index = np.zeros((b, run_steps, s), np.int32)
    weights = np.zeros((b, s), np.float32)
    for i, subs in enumerate(parts):
        for j, (text, weight) in enumerate(subs):
            cond_index[i, :, j] = rows(text)
            weights[i, j] = weight
    uncond_index = np.stack([rows(n) for n in negatives]).astype(np.int32)
    return ConditioningPlan(list(texts), cond_index, uncond_index, weights)
