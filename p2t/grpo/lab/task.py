"""The lab's verifiable multi-step task: addition chains of 3-4 two-digit numbers.

Prompt ``17+25+33+48=``; the response is one step per line, then the final answer::

    17+25=42
    42+33=75
    75+48=123
    #123

With ``ops_per_step=2`` a step (line) holds two additions joined by a space, the last line of the chain
the one or two that remain::

    17+25=42 42+33=75
    75+48=123
    #123

so a wrong step can hold right, uncertain tokens (the first result) beside the wrong ones.

Outcome reward: the final answer is the true sum. Step correctness: a line is correct when it is the
line the chain calls for given the response's own previous line (``prev+next=prev+next``, with prev the
result written on the line before, or the first number; with several additions per line, each one
continues from the true sum of the one before it), so a step is judged on its own arithmetic and an
early mistake does not make every later step wrong. The answer line ``#X`` is correct when X
repeats the previous line's result.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

STEP_SEPARATOR = "\n"
OP_JOINER = " "  # between the additions of one line (ops_per_step > 1)
_LINE = re.compile(r"^(\d+)\+(\d+)=(\d+)$")
_OP = re.compile(r"(\d+)\+(\d+)=(\d+)")


def check_ops_per_step(ops_per_step) -> int:
    if isinstance(ops_per_step, bool) or not isinstance(ops_per_step, int) or ops_per_step < 1:
        raise ValueError(f"ops_per_step must be a positive int, got {ops_per_step!r}")
    return ops_per_step


def parse_ops(line: str) -> Optional[List[tuple]]:
    """The additions ``(a, b, result)`` of a line, or None when it is not additions joined by ``OP_JOINER``."""
    out = []
    for part in line.split(OP_JOINER):
        m = _LINE.match(part)
        if m is None:
            return None
        out.append(tuple(int(g) for g in m.groups()))
    return out


@dataclass
class Problem:
    numbers: List[int]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.numbers)) + "="

    @property
    def answer(self) -> int:
        return sum(self.numbers)


def sample_problem(rng: random.Random, min_terms: int = 3, max_terms: int = 4) -> Problem:
    return Problem([rng.randint(10, 99) for _ in range(rng.randint(min_terms, max_terms))])


def problems(seed: int, n: int, min_terms: int = 3, max_terms: int = 4) -> List[Problem]:
    rng = random.Random(seed)
    return [sample_problem(rng, min_terms, max_terms) for _ in range(n)]


def parse_prompt(prompt: str) -> Problem:
    return Problem([int(x) for x in prompt.rstrip("=").split("+")])


def solution(problem: Problem, rng: Optional[random.Random] = None, error_rate: float = 0.0,
             ops_per_step: int = 1) -> str:
    """A worked solution, ``ops_per_step`` additions a line; with ``error_rate`` > 0 each addition's result
    is wrong with that probability (off by a small amount, the error carried forward as the next
    addition's left operand). The random draws do not depend on ``ops_per_step``."""
    check_ops_per_step(ops_per_step)
    ops, acc = [], problem.numbers[0]
    for x in problem.numbers[1:]:
        res = acc + x
        if rng is not None and error_rate > 0 and rng.random() < error_rate:
            res = max(0, res + rng.choice([-10, -2, -1, 1, 2, 10]))
        ops.append(f"{acc}+{x}={res}")
        acc = res
    lines = [OP_JOINER.join(ops[i:i + ops_per_step]) for i in range(0, len(ops), ops_per_step)]
    lines.append(f"#{acc}")
    return STEP_SEPARATOR.join(lines)


def expected_lines(problem: Problem, response: str, ops_per_step: int = 1) -> List[Optional[str]]:
    """For each line of ``response``, the line the chain calls for given the previous written line
    (None where that line left no result to continue from)."""
    check_ops_per_step(ops_per_step)
    lines = response.split(STEP_SEPARATOR)
    out: List[Optional[str]] = []
    acc: Optional[int] = problem.numbers[0]
    k = 1
    for line in lines:
        if k < len(problem.numbers):
            if acc is None:
                want = None
            else:
                ops, a = [], acc
                for x in problem.numbers[k:k + ops_per_step]:
                    ops.append(f"{a}+{x}={a + x}")
                    a += x
                want = OP_JOINER.join(ops)
            parsed = parse_ops(line)
            # a line continues the chain from its last result (one addition a line: a line with more does not)
            acc = parsed[-1][2] if parsed and (ops_per_step > 1 or len(parsed) == 1) else None
            k = min(k + ops_per_step, len(problem.numbers))
        elif k == len(problem.numbers):
            want = None if acc is None else f"#{acc}"
            k += 1
        else:
            want = ""  # nothing more is called for: any extra line is wrong
        out.append(want)
    return out


def step_labels(problem: Problem, response: str, ops_per_step: int = 1) -> List[bool]:
    """Correctness of each step (line) of ``response``."""
    return [want is not None and want != "" and line == want
            for line, want in zip(response.split(STEP_SEPARATOR), expected_lines(problem, response, ops_per_step))]


def char_labels(problem: Problem, response: str, ops_per_step: int = 1) -> List[int]:
    """Per-character PRM labels: 1 while the current line is still a prefix of the line the chain calls
    for; at a separator (and for a virtual trailing separator, the last entry) 1 iff the line is exactly
    right. Length ``len(response) + 1``."""
    out: List[int] = []
    lines = response.split(STEP_SEPARATOR)
    for line, want in zip(lines, expected_lines(problem, response, ops_per_step)):
        for j in range(len(line)):
            out.append(int(want is not None and want != "" and want.startswith(line[: j + 1])))
        out.append(int(want is not None and want != "" and line == want))
    return out


def wrong_step_kinds(problem: Problem, response: str, ops_per_step: int = 1) -> List[str]:
    """What each wrong step of ``response`` got wrong, judged at its first wrong addition: the result's
    offset from the right one (``"+1"``, ``"-10"``, ...) when the operands are right, else ``"answer"`` (a
    wrong ``#X`` line), ``"extra"`` (a line after the answer) or ``"malformed"`` (anything else, a line
    with too few or too many additions included)."""
    out = []
    for line, want in zip(response.split(STEP_SEPARATOR), expected_lines(problem, response, ops_per_step)):
        if want is not None and line == want:
            continue
        if want == "":
            out.append("extra")
            continue
        if want is not None and want.startswith("#"):
            out.append("answer")
            continue
        got, ref = parse_ops(line), parse_ops(want or "")
        kind = "malformed"
        if got and ref and len(got) == len(ref):
            for (a, b, r), (wa, wb, wr) in zip(got, ref):
                if (a, b, r) == (wa, wb, wr):
                    continue
                if (a, b) == (wa, wb):
                    kind = f"{r - wr:+d}"
                break
        out.append(kind)
    return out


def final_answer(response: str) -> Optional[int]:
    lines = [l for l in response.strip().split(STEP_SEPARATOR) if l]
    if not lines or not re.fullmatch(r"#\d+", lines[-1]):
        return None
    return int(lines[-1][1:])


def outcome_reward(prompts: Sequence[str], responses: Sequence[str], **columns) -> List[float]:
    """1.0 when the response ends with ``#<true sum>``, else 0.0."""
    return [float(final_answer(r) == parse_prompt(p).answer) for p, r in zip(prompts, responses)]
