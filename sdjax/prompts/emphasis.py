"""AUTOMATIC1111 attention syntax: `(word)`, `[word]`, `(word:1.3)`, escapes and BREAK.

The behaviour (including its quirks) is that of stable-diffusion-webui's
`modules/prompt_parser.py::parse_prompt_attention`, so prompts copied from A1111
weight the same tokens by the same factors:

- `(text)` multiplies by 1.1, `[text]` divides by 1.1, `(text:w)` multiplies by w;
  brackets nest multiplicatively.
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; a lone `\\` is kept.
- Unclosed `(` / `[` apply their factor up to the end of the prompt; unmatched
  closers are kept as literal text.
- `BREAK` (a whole word, upper case) outside any bracket becomes the entry
  `("BREAK", -1.0)`; the chunker starts a new 75-token chunk there. Inside
  brackets A1111 multiplies that -1 too, so the word is then ordinary text.
- Neighbouring pieces with exactly equal weights are merged.
"""

from __future__ import annotations

import re

from sdjax.errors import PromptError

__all__ = ["parse_prompt_attention", "PromptError", "BREAK", "ROUND_MULTIPLIER", "SQUARE_MULTIPLIER"]


BREAK = ("BREAK", -1.0)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One alternative per token kind, tried in order: escapes first, then openers,
# an explicit ":weight)" closer, plain closers, runs of ordinary text, and a lone
# ":" (which is ordinary text when it is not part of a weight).
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]        # escaped bracket or backslash
  | \\                  # lone backslash, kept literally
  | [(\[]               # opener
  | :\s*([+-]?[.\d]+)\s*\)   # explicit weight closing a round bracket
  | [)\]]               # closer
  | [^\\()\[\]:]+       # ordinary text
  | :                   # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into `(piece, weight)` pairs with A1111's attention rules.

    Returns at least one pair (`[("", 1.0)]` for an empty prompt). A `BREAK`
    separator appears as `("BREAK", -1.0)`. Weights are Python floats computed in
    the same order as A1111, so they compare equal to its output bit for bit.
    """
    pieces: list[list] = []  # mutable [text, weight] while brackets are open
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, explicit_weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif explicit_weight is not None and round_open:
            try:
                factor = float(explicit_weight)
            except ValueError:
                # A1111 fails here too; say where instead of a bare float() error.
                raise PromptError(
                    f"prompt weight {token!r} is not a number; write e.g. (word:1.2)"
                ) from None
            scale_from(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i > 0:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])

    # Unclosed brackets act as if closed at the end of the prompt.
    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)

    if not pieces:
        pieces = [["", 1.0]]

    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece_text, weight) for piece_text, weight in merged]
