"""The lab PRM's layout: how a (prompt, response) pair becomes the PRM's input, defined once.

The PRM reads ``BOS prompt line\\n line\\n ... line\\n``: the prompt and the response's lines, each line
ended by the step separator (a trailing one after the last line, where the policy wrote EOS), with the
policy's own character tokenizer. :data:`LAYOUT` holds the matching :class:`p2t.P2TScorer` options.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from . import task
from .tokenizer import CharTokenizer

#: :class:`p2t.P2TScorer` options that read a response the way the lab's PRM does
LAYOUT = {"template": "{prompt}{response}", "step_separator": task.STEP_SEPARATOR,
          "step_split": task.STEP_SEPARATOR}


def prm_text(prompt: str, response: str) -> str:
    """The PRM's view of a response: prompt, steps joined by the separator, one trailing separator."""
    return prompt + response + task.STEP_SEPARATOR


def token_ids(tok: CharTokenizer, text: str) -> List[int]:
    return tok.convert_tokens_to_ids(list(text))


def pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            if left:
                out[i, n - len(r):] = torch.tensor(r)
            else:
                out[i, :len(r)] = torch.tensor(r)
    return out


def prm_example(tok: CharTokenizer, problem: task.Problem, response: str, ops_per_step: int = 1):
    """(PRM input ids, per-token labels) of one response: labels -100 on BOS and the prompt."""
    text_ids = [tok.bos_token_id] + token_ids(tok, prm_text(problem.prompt, response))
    return text_ids, [-100] * (1 + len(problem.prompt)) + task.char_labels(problem, response, ops_per_step)
