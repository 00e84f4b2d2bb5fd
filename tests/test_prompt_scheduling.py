"""A1111 prompt editing / alternation / AND: the schedules its grammar gives, on a corpus of
tricky prompts; the per-step lookup tables built from them.

The first block's expected values are A1111's own doctests of
`get_learned_conditioning_prompt_schedules` (modules/prompt_parser.py, steps=10; the last two
with hires_steps=10), typed in. Its doctest `a [{b|d{:.5] c` is left out: the `|` is outside
anything its grammar accepts, so its grammar (lark) rejects that prompt and uses it unchanged,
which is what we do too (see `test_rejected_prompts_are_used_unchanged`)."""

import numpy as np
import pytest

from sdjax.prompts.scheduling import bucket, get_schedules, plan_conditioning, prompt_schedule, split_and

ALT10 = lambda a, b: [[i, a if i % 2 else b] for i in range(1, 11)]  # noqa: E731

A1111_DOCTESTS = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", ALT10("a", "(b:1.1)")),
    ("[fe|]male", ALT10("female", "male")),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_DOCTESTS)
def test_a1111_doctests(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_a1111_doctests_hires_pass():
    # Second pass of hires fix: a fraction counts from 1 (1.5 = half of the hires steps).
    assert get_schedules(["a [b:.5] c", "a [b:1.5] c"], 10, hires_steps=10) == [
        [[10, "a b c"]], [[5, "a  c"], [10, "a b c"]]]


# Written from the grammar (module docstring of sdjax.prompts.scheduling), steps = 10.
CORPUS = [
    # the example in A1111's comment, at 100 steps it is 25/50/60/75/100; here at 10
    ("a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][: in background:0.25]",
     [[2, "a mountain and an oak in foreground"], [6, "a lake and an oak in foreground in background"],
      [7, "a lake and an oak in background"], [10, "a lake and a christmas tree in background"]]),
    # steps vs fractions: a decimal point makes a fraction, 1.0 is the whole run, 1e1 is step 10
    ("[a:b:1.0]", [[10, "a"]]),
    ("[a:b:1]", [[1, "a"], [10, "b"]]),
    ("[a:b:1e1]", [[10, "a"]]),
    ("[a:b:20]", [[10, "a"]]),
    ("[a:b:-1]", [[10, "b"]]),
    ("[a:b:0.25]", [[2, "a"], [10, "b"]]),
    ("x [a: 3 ]", [[3, "x "], [10, "x a"]]),
    # [from::when], [:to:when]
    ("[a::5] x", [[5, "a x"], [10, " x"]]),
    ("[:b:5]", [[5, ""], [10, "b"]]),
    # emphasis inside edits and edits inside emphasis stay text for the emphasis parser
    ("(a [b:c:3]:1.2)", [[3, "(a b:1.2)"], [10, "(a c:1.2)"]]),
    ("[a:(b:1.3):0.25]", [[2, "a"], [10, "(b:1.3)"]]),
    ("a [b:c:0.25] (d:1.2", [[2, "a b (d:1.2"], [10, "a c (d:1.2"]]),
    # nesting: edits in edits, alternation in edits, edits in alternation
    ("[[a:b:1]:c:3]", [[1, "a"], [3, "b"], [10, "c"]]),
    ("[a:[b|c]:2]", [[1, "a"], [2, "a"]] + [[i, "b" if i % 2 else "c"] for i in range(3, 11)]),
    ("[a [b|c] d:e:0.3]", [[1, "a b d"], [2, "a c d"], [3, "a b d"]] + [[i, "e"] for i in range(4, 11)]),
    ("[a|[b:c:2]]", [[1, "a"], [2, "b"], [3, "a"]] + [[i, "a" if i % 2 else "c"] for i in range(4, 11)]),
    # escapes: an escaped colon is text, escaped brackets are not brackets (kept for emphasis)
    ("[a\\:b:c:2]", [[2, "a\\:b"], [10, "c"]]),
    ("a \\[b:c:2\\] d", [[10, "a \\[b:c:2\\] d"]]),
    # unbalanced and stray brackets / colons are text
    ("[a:b:c:3]", [[10, "[a:b:c:3]"]]),
    ("[a:b 3]", [[10, "[a:b 3]"]]),
    ("]a[ [b:2]", [[2, "]a[ "], [10, "]a[ b"]]),
    ("a ) b ( c [d:e:1]", [[1, "a ) b ( c d"], [10, "a ) b ( c e"]]),
]


@pytest.mark.parametrize("prompt,expected", CORPUS)
def test_corpus(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize("prompt", ["a | b [c:d:3]", "trail\\", "[a|b] | c"])
def test_rejected_prompts_are_used_unchanged(prompt):
    assert prompt_schedule(prompt, 10) == [[10, prompt]]


def test_old_scheduling_option():
    assert prompt_schedule("[a:b:1.0]", 10, old_scheduling=True) == [[1, "a"], [10, "b"]]
    assert prompt_schedule("[a:b:0.5]", 10, old_scheduling=True) == [[5, "a"], [10, "b"]]
    assert prompt_schedule("[a:b:1.5]", 10, hires_steps=6, old_scheduling=True) == [[1, "a"], [10, "b"]]
    assert prompt_schedule("[a:b:12]", 10, hires_steps=6) == [[2, "a"], [6, "b"]]


def test_and_weights():
    assert split_and("a cat :1.2 AND a dog :0.8") == [("a cat", 1.2), (" a dog", 0.8)]
    assert split_and("a cat AND a dog") == [("a cat", 1.0), (" a dog", 1.0)]
    assert split_and("ANDROID (a:1.2)") == [("ANDROID (a:1.2)", 1.0)]  # a whole word only
    assert split_and("x:-.5 AND y : 2.") == [("x", -0.5), (" y", 2.0)]


def test_plan_conditioning_tables():
    plan = plan_conditioning(["[red:blue:0.5] cube", "x :2 AND [y|z]"], ["[ugly:3]", ""], 10)
    assert plan.cond_index.shape == (2, 10, 2) and plan.uncond_index.shape == (2, 10)
    text = lambda idx: [plan.texts[i] for i in idx]  # noqa: E731
    # A1111: 0-based step k uses the first entry with k <= end (so red for steps 0..5)
    assert text(plan.cond_index[0, :, 0]) == ["red cube"] * 6 + ["blue cube"] * 4
    np.testing.assert_array_equal(plan.weights, [[1.0, 0.0], [2.0, 1.0]])
    assert text(plan.cond_index[1, :, 0]) == ["x"] * 10
    assert text(plan.cond_index[1, :, 1]) == [" y"] + [" y" if k % 2 else " z" for k in range(1, 10)]
    assert text(plan.uncond_index[0]) == [""] * 4 + ["ugly"] * 6
    assert text(plan.uncond_index[1]) == [""] * 10
    assert len(plan.texts) == len(set(plan.texts))
    assert [bucket(n) for n in (1, 8, 9, 20)] == [8, 8, 16, 32]
