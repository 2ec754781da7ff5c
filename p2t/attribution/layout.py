"""PRM inputs: one :class:`Row` per response (template, steps, separators, readout positions and the map
from PRM positions onto the policy's tokens), and the padded tensors of a micro-batch.

Layout of one PRM input: ``[specials] before(prompt) step_1 sep [suffix] step_2 sep [suffix] ...
after [specials]``; step k is read at the last token of its separator (``read_at="separator"``) or the
whole response at the last token (``read_at="last"``).

Policy tokens and steps:

* a policy token belongs to the step holding most of its characters (the earlier one on a tie); a
  token of a character split over several tokens (byte-level BPE) belongs to the step of the token
  that starts the character; a special token (no text) joins a step only when it lies strictly
  inside it; everything else (separators, whitespace between steps) is in no step (-1);
* same tokenizer for policy and PRM: the PRM input of step k is exactly the policy ids of step k that
  have text, in order (an identity on ids; attributions copied one to one);
* different tokenizers: each step's text is encoded with the PRM tokenizer and a PRM token's
  attribution is split over the policy tokens in proportion to the characters they share (mass
  preserved); a policy token spanning two steps keeps the mass of both.

Everything here is host work on NumPy arrays, vectorised over tokens, for a whole batch at once: one
Python path (:meth:`Layout.rows`; :meth:`Layout.row` is that path with a batch of one). Policy ids with
the PRM's own tokenizer (``skip_empty``: the ids-in entry points) run as one native pass where the
compiled extension has it (:func:`p2t.ops.host.layout_ids`, the fast twin). Both are tested against the
step-by-step oracle of the tests (``tests/reference_layout.py``).
"""
from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .warn import AttributionWarning
from .align import (Span, assign_steps_array, decode, encode_with_offsets, offsets_many, offsets_of, overlap_map,
                    row_of, special_ids, split_steps, vocab_table, within)
from .warn import AttributionWarning

__all__ = ["Row", "Layout", "AttributionWarning", "groups"]


@dataclass
class Row:
    """One response's PRM input and its map onto the policy tokens (NumPy int64 arrays)."""
    index: int
    input_ids: np.ndarray      # [L] PRM input
    token_step: np.ndarray     # [L] local step of each PRM position, -1 elsewhere
    readout: np.ndarray        # [K] positions where each step is read
    prompt_length: int
    map_prm: np.ndarray        # PRM positions ...
    map_policy: np.ndarray     # ... whose attribution goes to these policy tokens ...
    map_weight: Optional[np.ndarray]  # ... with these weights (None: 1, the identity map)
    policy_step: np.ndarray    # [n] local step of each policy token, -1 in none
    policy_spans: np.ndarray   # [n, 2] character spans of the policy tokens in ``text``
    steps: List[Span]
    text: str

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.readout.shape[0])

    @property
    def num_policy(self) -> int:
        return int(self.policy_step.shape[0])


class Layout:
    """Builds :class:`Row` s for one PRM tokenizer and layout (set once by :class:`P2TScorer`)."""

    def __init__(self, tokenizer, policy_tokenizer, same_tokenizer: bool, *, template, system_prompt,
                 add_special_tokens: bool, step_separator: str, separator_suffix: str, step_split, read_at: str,
                 max_length: Optional[int], truncation: str):
        self.tokenizer, self.policy_tokenizer, self.same_tokenizer = tokenizer, policy_tokenizer, same_tokenizer
        self.template, self.system_prompt = template, system_prompt
        self.add_special_tokens = add_special_tokens
        self.step_separator, self.separator_suffix = step_separator, separator_suffix
        self.step_split, self.read_at = step_split, read_at
        self.max_length, self.truncation = max_length, truncation
        self.sep_ids = self.encode(step_separator) if step_separator else []
        self.suffix_ids = self.encode(separator_suffix) if separator_suffix else []
        self.specials = self._special_wrap()
        self.policy_special = special_ids(policy_tokenizer)
        self.policy_vocab = _vocab_size(policy_tokenizer)
        self._special_table = None  # special[id] over the policy vocabulary (ids are checked to be in it)
        if self.policy_vocab <= 1 << 24:
            self._special_table = np.zeros(self.policy_vocab, dtype=bool)
            self._special_table[[t for t in self.policy_special if 0 <= t < self.policy_vocab]] = True
        # the native layout's constant inputs (p2t.ops.host.layout_ids): the separator ids, the step split's
        # code points (empty: one step; None: a callable split, which the kernel does not take)
        self._separator_torch = torch.tensor(self.sep_ids + self.suffix_ids, dtype=torch.int64)
        split = None if read_at == "last" else step_split
        self._split_cps = None if callable(split) else torch.from_numpy(
            np.frombuffer((split or "").encode("utf-32-le"), dtype=np.int32).copy())

    # ------------------------------------------------------------------ tokenizer helpers
    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _special_wrap(self) -> Tuple[List[int], List[int]]:
        """Special tokens the tokenizer puts before and after a single sequence (BOS, CLS ... SEP)."""
        if not self.add_special_tokens:
            return [], []
        core = self.encode("a")
        full = list(self.tokenizer.encode("a", add_special_tokens=True))
        for i in range(len(full) - len(core) + 1):
            if full[i:i + len(core)] == core:
                return full[:i], full[i + len(core):]
        return [], []

    def template_text(self, prompt: str) -> Tuple[str, str]:
        """The template's text before and after the response."""
        if self.template == "chat":
            mark = "\u2063P2T_RESPONSE\u2063"
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": mark}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
            if text.count(mark) != 1:
                raise ValueError("template='chat': the chat template does not render the assistant turn verbatim; "
                                 "pass a string template")
            before, after = text.split(mark)
        elif callable(self.template):
            before, after = self.template(prompt)
        else:
            before, after = self.template.split("{response}", 1)
            before, after = before.replace("{prompt}", prompt), after.replace("{prompt}", prompt)
        return before, after

    def template_parts(self, prompt: str) -> Tuple[List[int], List[int]]:
        return self.template_parts_many([prompt])[prompt]

    def template_parts_many(self, prompts: Sequence[str]) -> Dict[str, Tuple[List[int], List[int]]]:
        """PRM ids before and after the response for each distinct prompt, encoded in one batch."""
        distinct = list(dict.fromkeys(prompts))
        texts = [t for p in distinct for t in self.template_text(p)]
        enc = self._encode_many(texts)
        head, tail = self.specials
        return {p: (head + enc[2 * i], enc[2 * i + 1] + tail) for i, p in enumerate(distinct)}

    def _encode_many(self, texts: List[str]) -> List[List[int]]:
        """Ids of ``texts`` (no special tokens); the empty ones (a template's text after the response, mostly)
        are not sent to the tokenizer: a batch encode pays for each text it is given."""
        out: List[List[int]] = [[] for _ in texts]
        todo = [i for i, t in enumerate(texts) if t]
        if not todo:
            return out
        some = [texts[i] for i in todo]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if (getattr(self.tokenizer, "is_fast", False) and hasattr(backend, "encode_batch_fast")
                and backend.padding is None and backend.truncation is None):
            ids = [enc.ids for enc in backend.encode_batch_fast(some, add_special_tokens=False)]  # no offsets
        elif getattr(self.tokenizer, "is_fast", False):
            ids = [list(x) for x in self.tokenizer(some, add_special_tokens=False)["input_ids"]]
        else:
            ids = [self.encode(t) for t in some]
        for i, x in zip(todo, ids):
            out[i] = x
        return out

    # ------------------------------------------------------------------ rows
    def rows(self, prompts: Sequence[str], responses: Sequence[Optional[str]],
             policy_ids: Optional[Sequence[Sequence[int]]], *, hint: bool = True, skip_empty: bool = False,
             stacklevel: int = 4) -> List[Optional[Row]]:
        """One row per response; ``None`` for a response without a step when ``skip_empty``. The whole batch
        is laid out at once (:meth:`_build`); policy ids with the PRM's own tokenizer (``skip_empty``: what
        ``score_ids``, ``rewards_ids`` and ``advantages_ids`` ask) are decoded for the whole batch too, or
        laid out by the native kernel where the compiled extension holds it (:meth:`_rows_native`)."""
        parts = self.template_parts_many(prompts)  # prompts repeat (GRPO groups): each encoded once
        if responses is None and policy_ids is not None and skip_empty and self.same_tokenizer:
            return self._rows_ids(prompts, parts, policy_ids, stacklevel + 1)
        got = [self._policy_offsets(i, None if responses is None else responses[i],
                                    None if policy_ids is None else policy_ids[i], hint, skip_empty, stacklevel + 1)
               for i in range(len(prompts))]
        return self._build_from(range(len(prompts)), [parts[p] for p in prompts], got, skip_empty, stacklevel + 1)

    def row(self, i: int, parts, response: Optional[str], policy_ids, *, hint: bool = True,
            skip_empty: bool = False, stacklevel: int = 5) -> Optional[Row]:
        """The row of ``responses[i]`` (``parts``: its template's ids before and after the response):
        :meth:`rows`' layout with a batch of one."""
        got = self._policy_offsets(i, response, policy_ids, hint, skip_empty, stacklevel + 1)
        return self._build_from([i], [parts], [got], skip_empty, stacklevel + 1)[0]

    def _build_from(self, index, parts, got, skip_empty: bool, stacklevel: int) -> List[Optional[Row]]:
        """:meth:`_build` of rows given one by one (``got``: :meth:`_policy_offsets` of each, ``None``: no row)."""
        live = [g is not None for g in got]
        texts = [g[0] if g is not None else "" for g in got]
        n_b = np.fromiter((g[1].shape[0] if g is not None else 0 for g in got), dtype=np.int64, count=len(got))
        off = np.concatenate([[0], np.cumsum(n_b)])
        flat = np.concatenate([g[1] for g in got if g is not None] or [np.zeros(0, dtype=np.int64)])
        spans = np.concatenate([np.asarray(g[2], dtype=np.int64).reshape(-1, 2) for g in got if g is not None]
                               or [np.zeros((0, 2), dtype=np.int64)])
        return self._build(np.asarray(index, dtype=np.int64), parts, texts, flat.astype(np.int64, copy=False), off,
                           spans, np.asarray(live, dtype=bool), skip_empty, stacklevel + 1)

    def _rows_ids(self, prompts: Sequence[str], parts, policy_ids, stacklevel: int) -> List[Optional[Row]]:
        """:meth:`rows` of policy ids with the PRM's own tokenizer (``skip_empty``): the rows' ids laid end
        to end in one array (row offsets by cumsum), decoded and given their spans for the whole batch
        (:func:`~.align.offsets_many`), then :meth:`_build`; or the same rows from one native pass
        (:meth:`_rows_native`)."""
        B = len(prompts)
        flat, n_b = _flatten_ids(policy_ids)
        off = np.concatenate([[0], np.cumsum(n_b)])
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.policy_vocab):
            k = int(((flat < 0) | (flat >= self.policy_vocab)).argmax())
            i = int(np.searchsorted(off, k, side="right") - 1)
            raise ValueError(f"response_token_ids[{i}] holds the id {int(flat[k])}, outside the policy "
                             f"tokenizer's vocabulary [0, {self.policy_vocab})")
        native = self._rows_native(prompts, parts, flat, off, stacklevel + 1)
        if native is not None:
            return native
        texts, spans = offsets_many(self.policy_tokenizer, flat, off)
        return self._build(np.arange(B), [parts[p] for p in prompts], texts, flat, off, spans,
                           np.ones(B, dtype=bool), True, stacklevel + 1)

    def _build(self, index: np.ndarray, parts, texts: List[str], flat: np.ndarray, off: np.ndarray,
               spans: np.ndarray, live: np.ndarray, skip_empty: bool, stacklevel: int) -> List[Optional[Row]]:
        """The rows of a batch laid end to end: ``flat`` policy ids (row ``r`` holds ``off[r]:off[r + 1]``)
        with their row-local character ``spans`` in ``texts[r]``; ``index`` the response of each row,
        ``parts`` its template's ids, ``live`` False for a row that is not laid out (``None``). Step
        assignment, truncation and the PRM inputs are computed on those arrays (no loop over tokens, a few
        NumPy calls per batch; the PRM tokens of another tokenizer and their overlap map are per step);
        each :class:`Row` is a set of views into them."""
        B = len(texts)
        row = row_of(off)
        split = None if self.read_at == "last" else self.step_split
        steps = [split_steps(t, split) if (t and live[r]) else [] for r, t in enumerate(texts)]
        # a response without a step is an error unless it may be skipped; the rows before it are checked first
        stop = next((r for r in range(B) if live[r] and not steps[r]), None) if not skip_empty else None
        k_b = np.fromiter((len(x) for x in steps), dtype=np.int64, count=B)
        s_off = np.concatenate([[0], np.cumsum(k_b)])
        S = int(s_off[-1])
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=B)
        cbase = np.concatenate([[0], np.cumsum(lengths)])[:-1]  # the rows end to end in character space
        st = (np.asarray([sp for x in steps for sp in x], dtype=np.int64).reshape(-1, 2)
              + np.repeat(cbase, k_b)[:, None])
        special = (self._special_table[flat] if self._special_table is not None else
                   np.isin(flat, list(self.policy_special)))
        has_text = (spans[:, 1] > spans[:, 0]) | ~special
        g = assign_steps_array(spans + cbase[row][:, None], st, has_text, row_offsets=off)  # global step ids
        srow = np.repeat(np.arange(B), k_b)
        sel = np.nonzero((g >= 0) & has_text)[0]
        if self.same_tokenizer:  # the PRM input of step k: the policy ids of step k that have text
            counts = np.bincount(g[sel], minlength=S).astype(np.int64)
            prm_steps = None
        else:  # each step's text with the PRM tokenizer
            prm_steps = [encode_with_offsets(self.tokenizer, texts[r][a:b]) for r in range(B) for a, b in steps[r]]
            counts = np.fromiter((len(t) for t, _ in prm_steps), dtype=np.int64, count=S)
        head_n = np.asarray([len(p[0]) for p in parts], dtype=np.int64)
        tail_n = np.asarray([len(p[1]) for p in parts], dtype=np.int64)
        nsep = len(self.sep_ids)
        per_step = counts + nsep + len(self.suffix_ids)
        keep = self._truncate(index, k_b, s_off, srow, head_n, tail_n, per_step, B if stop is None else stop,
                              stacklevel + 1)
        if stop is not None:
            raise ValueError(f"responses[{int(index[stop])}] has no step: nothing but whitespace between the step "
                             f"splits ({self.step_split!r})")
        kept = (np.arange(S) - s_off[:-1][srow]) < keep[srow]
        if not kept.all():
            sel = sel[kept[g[sel]]]
            g = np.where(g >= 0, np.where(kept[np.maximum(g, 0)], g, -1), -1)
            per_step = np.where(kept, per_step, 0)
            counts = np.where(kept, counts, 0)
        has_steps = k_b > 0
        L_b = np.where(has_steps, head_n + np.bincount(srow, weights=per_step, minlength=B).astype(np.int64)
                       + tail_n, 0)
        P = np.concatenate([[0], np.cumsum(L_b)])
        # step k of row r starts after the row's head, its earlier steps and their separators
        cs = np.concatenate([[0], np.cumsum(per_step)])
        start = P[srow] + head_n[srow] + cs[:-1] - cs[s_off[:-1]][srow]
        ids = np.empty(int(P[-1]), dtype=np.int64)
        tstep = np.full(int(P[-1]), -1, dtype=np.int64)
        for which, n_x, at in ((0, head_n, P[:-1]), (1, tail_n, P[1:] - tail_n)):
            n_x = np.where(has_steps, n_x, 0)
            if n_x.any():
                pos = np.repeat(at, n_x) + within(n_x)
                ids[pos] = np.fromiter(itertools.chain.from_iterable(
                    parts[r][which] for r in np.nonzero(n_x)[0]), dtype=np.int64, count=int(n_x.sum()))
        sep_at = start + counts
        for o, t in enumerate(self.sep_ids + self.suffix_ids):
            ids[sep_at[kept] + o] = t
        local = np.where(g >= 0, g - s_off[:-1][row], -1)
        readout = (sep_at + nsep - 1 - P[srow]) if self.read_at == "separator" else (L_b - 1)[srow]
        if self.same_tokenizer:
            sel = sel[np.argsort(g[sel], kind="stable")]  # row by row, step by step (steps hold sorted tokens)
            gs = g[sel]
            pos = start[gs] + np.arange(sel.size) - (np.cumsum(counts) - counts)[gs]
            ids[pos] = flat[sel]
            tstep[pos] = local[sel]
            m_off = np.concatenate([[0], np.cumsum(np.bincount(row[sel], minlength=B))])
            map_prm, map_policy, map_weight = pos - P[row[sel]], sel - off[row[sel]], None
        else:
            map_prm, map_policy, map_weight, m_off = self._overlap(prm_steps, steps, kept, start, counts, s_off, srow,
                                                                   P, ids, tstep, spans, off)
        out: List[Optional[Row]] = []
        for r in range(B):
            if not has_steps[r]:
                out.append(None)
                continue
            a, b, s0, m0, m1 = off[r], off[r + 1], s_off[r], m_off[r], m_off[r + 1]
            out.append(Row(int(index[r]), ids[P[r]:P[r + 1]], tstep[P[r]:P[r + 1]], readout[s0:s0 + keep[r]],
                           int(head_n[r]), map_prm[m0:m1], map_policy[m0:m1],
                           None if map_weight is None else map_weight[m0:m1], local[a:b], spans[a:b],
                           steps[r][:keep[r]], texts[r]))
        return out

    def _truncate(self, index, k_b, s_off, srow, head_n, tail_n, per_step, stop: int, stacklevel: int) -> np.ndarray:
        """The steps of each row that are kept (``[B]``): all of them, or where the PRM input (head, steps with
        their separators, tail) is longer than ``max_length``, the leading steps that fit
        (:meth:`_steps_that_fit`; rows from ``stop`` on are not checked: the call raises there)."""
        keep = k_b.copy()
        if self.max_length is None or not per_step.size:
            return keep
        cum = np.cumsum(per_step)
        inside = cum - np.repeat(np.concatenate([[0], cum])[s_off[:-1]], k_b)  # inclusive, per row
        fits = head_n[srow] + inside + tail_n[srow] <= self.max_length
        total = head_n + np.bincount(srow, weights=per_step, minlength=k_b.size).astype(np.int64) + tail_n
        for r in np.nonzero((total > self.max_length) & (k_b > 0))[0]:
            r = int(r)
            if r >= stop:
                break
            keep[r] = self._steps_that_fit(int(index[r]), int(total[r]), int(fits[s_off[r]:s_off[r + 1]].sum()),
                                           int(k_b[r]), int(head_n[r] + per_step[s_off[r]] + tail_n[r]),
                                           stacklevel + 1)
        return keep

    def _overlap(self, prm_steps, steps, kept, start, counts, s_off, srow, P, ids, tstep, spans, off):
        """Another tokenizer's PRM tokens of each kept step written into ``ids`` / ``tstep``, and the map of
        their attributions onto the policy's tokens in proportion to the characters they share
        (:func:`~.align.overlap_map`): ``(map_prm, map_policy, map_weight, m_off)``, row after row."""
        S, B = kept.size, off.size - 1
        src_pos, src_span, maps = [], [], []
        for s in np.nonzero(kept)[0]:
            t, sp = prm_steps[s]
            r, a = int(srow[s]), steps[int(srow[s])][s - s_off[srow[s]]][0]
            p = start[s] + np.arange(len(t))
            ids[p] = t
            tstep[p] = s - s_off[r]
            src_pos.append((r, p - P[r]))
            src_span.append((r, [(a + s0, a + s1) for s0, s1 in sp]))
        per_row_pos = [[] for _ in range(B)]
        per_row_span = [[] for _ in range(B)]
        for (r, p), (_, sp) in zip(src_pos, src_span):
            per_row_pos[r].append(p)
            per_row_span[r] += sp
        counts_m = np.zeros(B, dtype=np.int64)
        for r in range(B):
            if not per_row_pos[r]:
                continue
            pos = np.concatenate(per_row_pos[r])
            trip = overlap_map(per_row_span[r], [tuple(x) for x in spans[off[r]:off[r + 1]].tolist()])
            maps.append((pos[np.asarray([x for x, _, _ in trip], dtype=np.int64)],
                         np.asarray([d for _, d, _ in trip], dtype=np.int64),
                         np.asarray([w for _, _, w in trip], dtype=np.float64)))
            counts_m[r] = len(trip)
        m_off = np.concatenate([[0], np.cumsum(counts_m)])
        if not maps:
            z = np.zeros(0, dtype=np.int64)
            return z, z, np.zeros(0, dtype=np.float64), m_off
        return (np.concatenate([m[0] for m in maps]), np.concatenate([m[1] for m in maps]),
                np.concatenate([m[2] for m in maps]), m_off)

    def _rows_native(self, prompts: Sequence[str], parts, flat: np.ndarray, off: np.ndarray,
                     stacklevel: int) -> Optional[List[Optional[Row]]]:
        """:meth:`_rows_ids` in one native pass (:func:`p2t.ops.host.layout_ids`); ``None`` where it does not
        apply (no compiled kernel, a callable ``step_split``, a policy tokenizer whose token pieces are not its
        text: :func:`_native_table`) or where a row's text is not what the tokenizer decodes (bytes that are
        not UTF-8, added tokens that decode otherwise): then the NumPy path runs, which computes the same rows."""
        from ..ops import host
        if self._split_cps is None or not host.has_layout():
            return None
        tok = self.policy_tokenizer
        got = _native_table(tok)
        if got is None:
            return None
        kind, pieces, table = got
        if flat.size and int(flat.max()) >= table.shape[0]:
            return None  # ids the table does not hold (checked against the tokenizer's size already)
        keys = list(parts)
        where = {p: q for q, p in enumerate(keys)}
        row_frame = np.fromiter((where[p] for p in prompts), dtype=np.int64, count=len(prompts))
        sizes = np.fromiter((len(x) for p in keys for x in parts[p]), dtype=np.int64, count=2 * len(keys))
        frame = np.fromiter(itertools.chain.from_iterable(x for p in keys for x in parts[p]), dtype=np.int64,
                            count=int(sizes.sum()))
        frame_off = np.concatenate([[0], np.cumsum(sizes)])
        got = host.layout_ids(torch.from_numpy(flat), torch.from_numpy(off), pieces, table, self._split_cps,
                              torch.from_numpy(frame), torch.from_numpy(frame_off), torch.from_numpy(row_frame),
                              self._separator_torch, len(self.sep_ids), self.max_length, self.read_at == "last")
        (buf, u_off, spans, steps, s_off, policy_step, keep, total, first, ids, tstep, P, readout, ro_off,
         map_prm, map_policy, m_off) = (t.numpy() for t in got)
        texts = _texts(tok, kind, buf, u_off, flat, off)
        if texts is None:
            return None
        k_b = np.diff(s_off)
        if self.max_length is not None:
            for i in np.nonzero((total > self.max_length) & (k_b > 0))[0]:
                i = int(i)
                self._steps_that_fit(i, int(total[i]), int(keep[i]), int(k_b[i]), int(first[i]), stacklevel + 1)
        head_n = (frame_off[1::2] - frame_off[0::2][:len(keys)])[row_frame]
        span_list = [tuple(x) for x in steps.tolist()]
        out: List[Optional[Row]] = []
        for i in range(len(prompts)):
            if not k_b[i]:
                out.append(None)
                continue
            a, b, s0, m0, m1 = off[i], off[i + 1], s_off[i], m_off[i], m_off[i + 1]
            out.append(Row(i, ids[P[i]:P[i + 1]], tstep[P[i]:P[i + 1]], readout[ro_off[i]:ro_off[i + 1]],
                           int(head_n[i]), map_prm[m0:m1], map_policy[m0:m1], None, policy_step[a:b], spans[a:b],
                           span_list[s0:s0 + keep[i]], texts[i]))
        return out

    def _steps_that_fit(self, i: int, total: int, keep: int, num_steps: int, first: int, stacklevel: int) -> int:
        """``keep``, the number of leading steps of ``responses[i]`` whose PRM input fits in ``max_length``
        (the input, ``total`` tokens with all ``num_steps`` steps, is longer; the cumulative length grows, so
        the steps that fit are a prefix), checked: ``first`` is the input's length with its first step only.
        Raises under ``truncation="error"`` or when not even the first step fits; warns otherwise
        (``stacklevel``: that of the warning, counted from this method)."""
        if self.truncation == "error":
            raise ValueError(f"responses[{i}]: the PRM input has {total} tokens, more than max_length="
                             f"{self.max_length}; shorten it or pass truncation='steps'")
        if keep == 0:
            raise ValueError(f"responses[{i}]: not even its first step fits in the PRM's max_length="
                             f"{self.max_length} ({first} tokens with the prompt)")
        warnings.warn(f"responses[{i}]: the PRM input has {total} tokens, more than max_length={self.max_length}; "
                      f"kept the first {keep} of {num_steps} steps (the rest get segment id -1 and score 0)",
                      AttributionWarning, stacklevel=stacklevel)
        return keep

    def _policy_offsets(self, i, response, ids, hint: bool, skip_empty: bool, stacklevel: int):
        ptok = self.policy_tokenizer
        if ids is None:
            if not response:
                if skip_empty:
                    return None
                raise ValueError(f"responses[{i}] is empty")
            ids, spans = encode_with_offsets(ptok, response)
            return response, np.asarray(ids, dtype=np.int64), spans
        ids = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            if skip_empty:
                return None
            raise ValueError(f"response_token_ids[{i}] is empty")
        bad = (ids < 0) | (ids >= self.policy_vocab)
        if bad.any():
            raise ValueError(f"response_token_ids[{i}] holds the id {int(ids[bad.argmax()])}, outside the policy "
                             f"tokenizer's vocabulary [0, {self.policy_vocab})")
        text, spans = offsets_of(ptok, ids.tolist(), ids, response if hint else None)
        if response is not None and text != response:
            warnings.warn(f"responses[{i}] differs from the decoded response_token_ids[{i}]; steps are taken "
                          "from the decoded tokens", AttributionWarning, stacklevel=stacklevel)
        if not text:
            if skip_empty:
                return text, ids, spans
            raise ValueError(f"response_token_ids[{i}] decodes to an empty response")
        return text, ids, spans


def _flatten_ids(policy_ids: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of token ids (lists or 1-D tensors) laid end to end: int64 ``[n]`` and each row's length."""
    B = len(policy_ids)
    if B and all(isinstance(x, torch.Tensor) for x in policy_ids):
        rows = [x.reshape(-1) for x in policy_ids]
        n_b = np.fromiter((x.numel() for x in rows), dtype=np.int64, count=B)
        return torch.cat(rows).to("cpu", torch.int64).numpy(), n_b
    rows = [x.reshape(-1).tolist() if isinstance(x, torch.Tensor) else x for x in policy_ids]
    n_b = np.fromiter((len(x) for x in rows), dtype=np.int64, count=B)
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(n_b.sum())), n_b


def _native_table(tokenizer):
    """The policy tokenizer's vocabulary for the native layout (:func:`p2t.ops.host.layout_ids`):
    ``(kind, pieces, table)`` with ``kind`` ``"bytes"`` (byte-level BPE: ``pieces`` uint8 UTF-8 bytes) or
    ``"text"`` (token strings that join into the text, a ``Fuse`` decoder: int32 code points) and ``table``
    one int64 per id (its piece and whether it is special); built once per tokenizer from its
    :class:`~.align.VocabTable`. ``None`` where the pieces are not the text (word pieces, metaspace: the NumPy
    path decodes those rows) or the table cannot be built."""
    decoder = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__
    if decoder == "ByteLevel":
        kind = "bytes"
    elif decoder == "Fuse" and getattr(tokenizer, "convert_ids_to_tokens", None) is not None:
        kind = "text"
    else:
        return None
    table = vocab_table(tokenizer, kind)
    if table is None or table.flat is None:
        return None
    hit = _NATIVE.get(tokenizer)
    if hit is None or hit[0] is not table:
        from ..ops.host import piece_table_entries
        buf, starts, lens = table.flat
        special = np.zeros(lens.shape[0], dtype=bool)
        special[[t for t in special_ids(tokenizer) if 0 <= t < lens.shape[0]]] = True
        entries = piece_table_entries(starts.astype(np.int64), lens.astype(np.int64), special)
        pieces = torch.from_numpy(np.array(buf if kind == "bytes" else buf.view(np.int32)))  # a writable copy
        hit = (table, None if entries is None else (kind, pieces, entries))
        _NATIVE[tokenizer] = hit
    return hit[1]


# tokenizer -> (the VocabTable it was built from, the native layout's (kind, pieces, table) or None)
_NATIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _texts(tokenizer, kind: str, buf: np.ndarray, u_off: np.ndarray, flat: np.ndarray,
           off: np.ndarray) -> Optional[List[str]]:
    """The rows' texts from the native layout's pieces (``kind`` ``"bytes"``: UTF-8, ``"text"``: code points),
    ``None`` when a row's bytes are not UTF-8 or hold added tokens that the tokenizer decodes otherwise."""
    texts = []
    raw = buf.tobytes()
    if kind == "bytes":
        base = getattr(tokenizer, "vocab_size", None)
        added = not isinstance(base, int) or (flat.size and int(flat.max()) >= base)
        for r in range(off.size - 1):
            try:
                text = raw[u_off[r]:u_off[r + 1]].decode("utf-8")
            except UnicodeDecodeError:
                return None
            if added and text != decode(tokenizer, flat[off[r]:off[r + 1]].tolist()):
                return None
            texts.append(text)
        return texts
    return [raw[4 * u_off[r]:4 * u_off[r + 1]].decode("utf-32-le") for r in range(off.size - 1)]


def _vocab_size(tokenizer) -> int:
    """Number of token ids of a tokenizer (added tokens included)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        n = getattr(tokenizer, "vocab_size", None)
        return int(n) if isinstance(n, int) else 1 << 62


def groups(rows: Sequence[Row], cost, budget: int) -> List[List[int]]:
    """Micro-batches of ``rows`` (indices): sorted by length, longest first, grouped while rows x cost
    of the first <= ``budget`` (one row at least)."""
    order = sorted(range(len(rows)), key=lambda r: -rows[r].length)
    out, cur = [], []
    for r in order:
        if cur and (len(cur) + 1) * cost(rows[cur[0]]) > budget:
            out.append(cur)
            cur = []
        cur.append(r)
    return out + ([cur] if cur else [])

