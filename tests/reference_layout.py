"""The layout's oracle: each response's PRM input built on its own, step by step, with list-based step
assignment (:func:`assign_steps`) and the overlap map, as the engine first defined it (the policy tokens'
offsets and the truncation messages are the layout's own). The engine's batch
layout (:meth:`p2t.attribution.layout.Layout.rows`, NumPy) and its native twin (``p2t_host::layout_ids``)
are tested against it: rows, warnings and errors."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from p2t.attribution.align import Span, encode_with_offsets, overlap, overlap_map, split_steps
from p2t.attribution.layout import Row

__all__ = ["assign_steps", "reference_row", "reference_rows"]


def assign_steps(token_spans: Sequence[Span], steps: Sequence[Span],
                 has_text: Optional[Sequence[bool]] = None) -> List[int]:
    """For each token, the step (index into ``steps``) it overlaps most, or -1 when it overlaps none.

    A token whose characters fall in two steps belongs to the step holding most of them (the earlier
    one on a tie). A token with an empty span that has text (``has_text[i]``: a byte-level BPE piece
    of a character the token before it started) belongs to the step of the token before it (of the
    token after it when it leads the response, as a SentencePiece "▁" that decodes to nothing there).
    A token without text (a special token) joins a step only when it lies strictly inside it. Spans
    are sorted, so each step's tokens form one contiguous run."""
    out, k = [], 0
    lead = 0  # leading tokens with text but no characters: they take the step of the first token after them
    for i, span in enumerate(token_spans):
        while k < len(steps) and steps[k][1] <= span[0]:
            k += 1
        if span[0] == span[1]:
            if has_text is not None and has_text[i]:  # the rest of a character split over tokens
                if out:
                    out.append(out[-1])
                else:
                    lead += 1
                continue
            # no text (a special token): it joins the step it lies strictly inside
            inside = k < len(steps) and steps[k][0] < span[0] < steps[k][1]
            out.append(k if inside else -1)
            if lead:
                out, lead = [out[-1]] * lead + out, 0
            continue
        best, best_ov = -1, 0
        j = k
        while j < len(steps) and steps[j][0] < span[1]:
            ov = overlap(span, steps[j])
            if ov > best_ov:
                best, best_ov = j, ov
            j += 1
        out.append(best)
        if lead:
            out, lead = [best] * lead + out, 0
    if lead:
        out = [-1] * lead
    return out


def reference_row(self, i: int, parts, response: Optional[str], policy_ids, *, hint: bool = True,
                  skip_empty: bool = False, stacklevel: int = 5) -> Optional[Row]:
    """The row of ``responses[i]`` built on its own, step by step (``self``: the :class:`Layout`)."""
    got = self._policy_offsets(i, response, policy_ids, hint, skip_empty, stacklevel + 1)  # its decode, its checks
    if got is None:
        return None
    text, ids, pspans = got
    spans = np.asarray(pspans, dtype=np.int64).reshape(-1, 2)
    steps = split_steps(text, None if self.read_at == "last" else self.step_split)
    if not steps:
        if skip_empty:
            return None
        raise ValueError(f"responses[{i}] has no step: nothing but whitespace between the step splits "
                         f"({self.step_split!r})")
    special = [t in self.policy_special for t in ids.tolist()]
    has_text = [(b > a) or not s for (a, b), s in zip(spans.tolist(), special)]
    policy_step = np.asarray(assign_steps([tuple(s) for s in spans.tolist()], steps, has_text), dtype=np.int64)
    has_text = np.asarray(has_text, dtype=bool)
    head, tail = parts
    nsep, nsuf = len(self.sep_ids), len(self.suffix_ids)
    per_sep = nsep + nsuf

    if self.same_tokenizer:  # the PRM input of step k: the policy ids of step k that have text
        sel = np.nonzero((policy_step >= 0) & has_text)[0]
        counts = np.bincount(policy_step[sel], minlength=len(steps))
        step_tokens = None
    else:
        step_tokens = [encode_with_offsets(self.tokenizer, text[a:b]) for a, b in steps]
        counts = np.asarray([len(t) for t, _ in step_tokens], dtype=np.int64)
    per_step = counts + per_sep
    keep = len(steps)
    if self.max_length is not None:
        total = len(head) + int(per_step.sum()) + len(tail)
        if total > self.max_length:
            fits = len(head) + np.cumsum(per_step) + len(tail) <= self.max_length
            first = len(head) + int(per_step[0]) + len(tail)
            keep = self._steps_that_fit(i, total, int(fits.sum()), len(steps), first, stacklevel + 1)  # its messages
    steps = steps[:keep]
    policy_step = np.where(policy_step < keep, policy_step, -1)
    counts = counts[:keep]

    # positions: step k's tokens start after the head, the earlier steps and their separators
    starts = len(head) + np.concatenate([[0], np.cumsum(counts)[:-1]]) + np.arange(keep) * per_sep
    L = len(head) + int(counts.sum()) + keep * per_sep + len(tail)
    input_ids = np.empty(L, dtype=np.int64)
    token_step = np.full(L, -1, dtype=np.int64)
    input_ids[:len(head)] = head
    input_ids[L - len(tail):] = tail
    sep_at = starts + counts  # first separator position of each step
    for o, t in enumerate(self.sep_ids + self.suffix_ids):
        input_ids[sep_at + o] = t
    if self.same_tokenizer:
        sel = sel[policy_step[sel] >= 0]
        order = np.argsort(policy_step[sel], kind="stable")  # already sorted unless steps were given unordered
        sel = sel[order]
        k = policy_step[sel]
        rank = np.arange(sel.size) - np.concatenate([[0], np.cumsum(counts)])[k]
        pos = starts[k] + rank
        input_ids[pos] = ids[sel]
        token_step[pos] = k
        map_prm, map_policy, map_weight = pos, sel, None
    else:
        pos_l, span_l = [], []
        for k in range(keep):
            t, sp = step_tokens[k]
            a = steps[k][0]
            p = starts[k] + np.arange(len(t))
            input_ids[p] = t
            token_step[p] = k
            pos_l.append(p)
            span_l += [(a + s0, a + s1) for s0, s1 in sp]
        pos = np.concatenate(pos_l) if pos_l else np.zeros(0, dtype=np.int64)
        trip = overlap_map(span_l, [tuple(s) for s in spans.tolist()])
        src = np.asarray([s for s, _, _ in trip], dtype=np.int64)
        map_prm = pos[src] if src.size else src
        map_policy = np.asarray([d for _, d, _ in trip], dtype=np.int64)
        map_weight = np.asarray([w for _, _, w in trip], dtype=np.float64)
    if self.read_at == "separator":
        readout = sep_at + nsep - 1
    else:
        readout = np.asarray([L - 1], dtype=np.int64)
    return Row(i, input_ids, token_step, readout.astype(np.int64), len(head),
               np.asarray(map_prm, dtype=np.int64).reshape(-1), np.asarray(map_policy, dtype=np.int64).reshape(-1),
               map_weight, policy_step, spans, list(steps), text)


def reference_rows(self, prompts: Sequence[str], responses, policy_ids, *, hint: bool = True,
                   skip_empty: bool = False) -> List[Optional[Row]]:
    """:func:`reference_row` of every response."""
    return [reference_row(self, i, self.template_parts(p), None if responses is None else responses[i],
                          None if policy_ids is None else policy_ids[i], hint=hint, skip_empty=skip_empty)
            for i, p in enumerate(prompts)]
