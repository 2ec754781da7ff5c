"""The lab's verifiable multi-step task: addition chains of 3-4 two-digit numbers.

Prompt ``17+25+33+48=``; the response is one step per line, then the final answer::

    17+25=42
    42+33=75
    75+48=123
    #123

Outcome reward: the final answer is the true sum. Step correctness: a line is correct when it is the
line the chain calls for given the response's own previous line (``prev+next=prev+next``, with prev the
result written on the line before, or the first number), so a step is judged on its own arithmetic
and an early mistake does not make every later step wrong. The answer line ``#X`` is correct when X
repeats the previous line's result.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

STEP_SEPARATOR = "\n"
_LINE = re.compile(r"^(\d+)\+(\d+)=(\d+)$")


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


def solution(problem: Problem, rng: Optional[random.Random] = None, error_rate: float = 0.0) -> str:
    """A worked solution; with ``error_rate`` > 0 each step result is wrong with that probability
    (off by a small amount, the error carried forward as the next step's left operand)."""
    lines, acc = [], problem.numbers[0]
    for x in problem.numbers[1:]:
        res = acc + x
        if rng is not None and error_rate > 0 and rng.random() < error_rate:
            res = max(0, res + rng.choice([-10, -2, -1, 1, 2, 10]))
        lines.append(f"{acc}+{x}={res}")
        acc = res
    lines.append(f"#{acc}")
    return STEP_SEPARATOR.join(lines)


def expected_lines(problem: Problem, response: str) -> List[Optional[str]]:
    """For each line of ``response``, the line the chain calls for given the previous written line."""
    lines = response.split(STEP_SEPARATOR)
    out: List[Optional[str]] = []
    acc: Optional[int] = problem.numbers[0]
    k = 1
    for line in lines:
        if k < len(problem.numbers):
            want = None if acc is None else f"{acc}+{problem.numbers[k]}={acc + problem.numbers[k]}"
            m = _LINE.match(line)
            acc = int(m.group(3)) if m else None
            k += 1
        elif k == len(problem.numbers):
            want = None if acc is None else f"#{acc}"
            k += 1
        else:
            want = ""  # nothing more is called for: any extra line is wrong
        out.append(want)
    return out


def step_labels(problem: Problem, response: str) -> List[bool]:
    """Correctness of each step (line) of ``response``."""
    return [want is not None and want != "" and line == want
            for line, want in zip(response.split(STEP_SEPARATOR), expected_lines(problem, response))]


def char_labels(problem: Problem, response: str) -> List[int]:
    """Per-character PRM labels: 1 while the current line is still a prefix of the line the chain calls
    for; at a separator (and for a virtual trailing separator, the last entry) 1 iff the line is exactly
    right. Length ``len(response) + 1``."""
    out: List[int] = []
    lines = response.split(STEP_SEPARATOR)
    for line, want in zip(lines, expected_lines(problem, response)):
        for j in range(len(line)):
            out.append(int(want is not None and want != "" and want.startswith(line[: j + 1])))
        out.append(int(want is not None and want != "" and line == want))
    return out


def final_answer(response: str) -> Optional[int]:
    lines = [l for l in response.strip().split(STEP_SEPARATOR) if l]
    if not lines or not re.fullmatch(r"#\d+", lines[-1]):
        return None
    return int(lines[-1][1:])


def outcome_reward(prompts: Sequence[str], responses: Sequence[str], **columns) -> List[float]:
    """1.0 when the response ends with ``#<true sum>``, else 0.0."""
    return [float(final_answer(r) == parse_prompt(p).answer) for p, r in zip(prompts, responses)]
