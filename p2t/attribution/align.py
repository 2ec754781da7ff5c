"""Text-side helpers of the attribution engine: step splitting, token character offsets, and the
overlap-weighted map from PRM tokens onto policy tokens.

Everything here is plain Python on token ids and character spans ``(start, end)`` (end exclusive);
no tensors, no model. Tokenizers are duck-typed: ``encode(text, add_special_tokens=False)`` and
``decode(ids)`` are enough; a fast tokenizer's ``offset_mapping`` is used when it is available.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .warn import warn_once

Span = Tuple[int, int]
StepSplit = Union[str, None, Callable[[str], List[Span]]]


def split_steps(text: str, split: StepSplit) -> List[Span]:
    """Character spans of the steps of ``text``.

    ``split`` is the text between steps (``"\\n\\n"``: blank lines, ``"\\n"``: one step per line),
    ``None`` (the whole text is one step) or a callable returning the spans itself. Leading and
    trailing whitespace is trimmed from each step; steps that are empty or only whitespace are dropped.
    """
    if callable(split):
        spans = []
        for k, span in enumerate(split(text)):
            try:
                a, b = (int(v) for v in span)
            except (TypeError, ValueError):
                raise ValueError(f"step_split returned {span!r} for step {k}; it must return (start, end) "
                                 "character spans") from None
            if not 0 <= a <= b <= len(text) or (spans and a < spans[-1][1]):
                raise ValueError(f"step_split returned the span {(a, b)} for step {k} of a text of {len(text)} "
                                 "characters; spans must be ordered, non-overlapping and within [0, len(text)]")
            spans.append((a, b))
    else:
        if split is not None and (not isinstance(split, str) or not split):
            raise ValueError(f"step_split must be a non-empty string, None or a callable, got {split!r}")
        out, pos = [], 0
        for piece in ([text] if split is None else text.split(split)):  # trimmed by str.strip (C, not per char)
            core = piece.strip()
            if core:
                a = pos + len(piece) - len(piece.lstrip())
                out.append((a, a + len(core)))
            pos += len(piece) + (len(split) if split is not None else 0)
        return out
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def decode(tokenizer, ids: Sequence[int]) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "is_fast", False):  # the Rust decoder, no Python per token
        return backend.decode(list(ids), skip_special_tokens=True)
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    except TypeError:  # tokenizers of the user's own with a smaller decode signature
        return tokenizer.decode(list(ids))


def _contiguous_array(a: np.ndarray, b: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """:func:`_contiguous` on arrays of starts and ends (empty where ``b <= a``): ``[n, 2]`` int64."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    text = b > a
    e = np.where(text, np.minimum(b, hi), lo)
    if text.any():
        e[len(e) - 1 - int(np.argmax(text[::-1]))] = hi  # the last token with text reaches the end
    pos = np.maximum.accumulate(np.concatenate([[lo], e]))
    return np.stack([pos[:-1], pos[1:]], axis=1)


def _contiguous(spans: List[Optional[Span]], lo: int, hi: int) -> List[Span]:
    """Close the gaps between consecutive spans (a gap joins the token after it, as byte-level BPE puts
    a leading space in the next token) so that the spans tile ``[lo, hi)``. ``None`` spans (special
    tokens) become empty spans at the current position. A token whose characters all belong to earlier
    tokens (byte-level BPE splits one character such as "×" or "日" into several tokens with the same
    span; a SentencePiece "▁" piece shares its character with the next token) gets an empty span too:
    :func:`assign_steps_array` keeps it with the token before it when it is told the token has text."""
    arr = np.asarray([(0, 0) if s is None else s for s in spans], dtype=np.int64).reshape(-1, 2)
    out = _contiguous_array(arr[:, 0], arr[:, 1], lo, hi)
    return [(int(x), int(y)) for x, y in out.tolist()]


def encode_with_offsets(tokenizer, text: str) -> Tuple[List[int], List[Span]]:
    """Token ids of ``text`` (no special tokens) and their character spans, tiling ``[0, len(text))``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        return ids, _contiguous(spans, 0, len(text))
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    decoded, spans = offsets_from_ids(tokenizer, ids)
    if decoded != text:  # lossy tokenizer (unknown characters): spread the spans proportionally
        scale = len(text) / max(len(decoded), 1)
        spans = [(int(round(a * scale)), int(round(b * scale))) for a, b in spans]
    return ids, _contiguous(spans, 0, len(text))


def offsets_from_ids(tokenizer, ids: Sequence[int], text: Optional[str] = None) -> Tuple[str, List[Span]]:
    """Decoded text of ``ids`` (special tokens skipped) and each token's character span in it.

    In order: byte-level BPE tokenizers (GPT-2, Qwen, Llama-3) from the token bytes; token strings that
    concatenate to the decoded text (character-level vocabularies); when ``text`` re-encodes to exactly
    ``ids`` with a fast tokenizer, its offset mapping; tokens decoded one at a time; and as a last
    resort by decoding growing prefixes. The first two never re-tokenize.
    """
    full, spans = offsets_array(tokenizer, ids, text)
    return full, [(int(a), int(b)) for a, b in spans.tolist()]


@dataclass(eq=False)
class VocabTable:
    """One tokenizer's vocabulary as each token's text (``kind="text"``: the token string, "" for special
    tokens) or bytes (``"bytes"``: byte-level BPE), built once per tokenizer and size (:func:`vocab_table`).

    values: per id, the token's str or bytes; lengths: int64 ``[size]`` their lengths; flat: the values laid
    end to end in one NumPy buffer (UTF-32 code points for ``"text"``, bytes for ``"bytes"``) with each
    token's start and length in it, ``None`` when the texts do not encode (lone surrogates). Gathering a
    row's tokens from ``flat`` reads no Python object per token (a vocabulary of 10^5 strings hit at
    random misses the cache on every one)."""
    kind: str
    size: int
    values: List[Union[str, bytes]]
    lengths: np.ndarray
    flat: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]

    def gather(self, idx: np.ndarray):
        """The concatenated entries of the tokens ``idx`` from :attr:`flat`, and their lengths."""
        buf, starts, lens = self.flat
        n = lens[idx]
        ends = np.cumsum(n)
        total = int(ends[-1]) if ends.size else 0
        pos = np.repeat(starts[idx] - (ends - n), n) + np.arange(total, dtype=np.int64)
        return buf[pos], n

    def text(self, ids: List[int], idx: np.ndarray) -> Tuple[str, np.ndarray]:
        """The token strings of ``ids`` joined, and their lengths (``"text"``)."""
        if self.flat is not None:
            cps, n = self.gather(idx)
            return cps.tobytes().decode("utf-32-le"), n
        return "".join([self.values[i] for i in ids]), self.lengths[idx]

    def bytes(self, ids: List[int], idx: np.ndarray) -> bytes:
        """The token bytes of ``ids`` concatenated (``"bytes"``)."""
        if self.flat is not None:
            return self.gather(idx)[0].tobytes()
        return b"".join([self.values[i] for i in ids])


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {kind: VocabTable}


def vocab_table(tokenizer, kind: str) -> Optional[VocabTable]:
    """The :class:`VocabTable` of ``tokenizer`` (one ``convert_ids_to_tokens`` over the vocabulary, reused
    while the size holds); ``None`` for a tokenizer without ``len()`` and ``convert_ids_to_tokens`` (token
    offsets then come from decoding, token by token: slower, and said once)."""
    try:
        size = len(tokenizer)
        slot = _TABLES.setdefault(tokenizer, {})
        hit = slot.get(kind)
        if hit is not None and hit.size == size:
            return hit
        toks = tokenizer.convert_ids_to_tokens(list(range(size)))
    except (TypeError, AttributeError, NotImplementedError) as e:  # a tokenizer without a vocabulary to list
        warn_once(("vocab_table", type(tokenizer)), f"the tokenizer {type(tokenizer).__name__} cannot list its "
                  f"vocabulary ({type(e).__name__}: {e}); token offsets are found by decoding token by token "
                  "(slower). Give it __len__ and convert_ids_to_tokens to take the table path")
        return None
    special = special_ids(tokenizer)
    if kind == "bytes":
        table = _unicode_to_byte()
        vals = [b"" if (i in special or t is None) else
                (bytes(table[c] for c in t) if all(c in table for c in t) else t.encode("utf-8"))
                for i, t in enumerate(toks)]
    else:
        vals = ["" if (i in special or t is None) else str(t) for i, t in enumerate(toks)]
    lens = np.fromiter((len(v) for v in vals), dtype=np.int64, count=size)
    try:
        if kind == "bytes":
            buf = np.frombuffer(b"".join(vals), dtype=np.uint8)
        else:
            buf = np.frombuffer("".join(vals).encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:  # lone surrogates: the table is joined per call instead
        flat = None
    else:
        flat = (buf, (np.cumsum(lens) - lens).astype(np.int32 if buf.size < 2 ** 31 else np.int64),
                lens.astype(np.int32))  # small tables: gathered at random, they stay in cache
    slot[kind] = VocabTable(kind, size, vals, lens, flat)
    return slot[kind]


def offsets_array(tokenizer, ids: Sequence[int], text: Optional[str] = None) -> Tuple[str, np.ndarray]:
    """:func:`offsets_from_ids` with the spans as an int64 ``[n, 2]`` array (the engine's host path:
    vectorised over tokens)."""
    idx = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids if isinstance(ids, list) else idx.tolist()
    return offsets_of(tokenizer, ids, idx, text)


def offsets_of(tokenizer, ids: List[int], idx: np.ndarray, text: Optional[str]) -> Tuple[str, np.ndarray]:
    """:func:`offsets_array` with the ids both as a list and as an int64 array (the caller has both)."""
    fast = _byte_level_offsets(tokenizer, ids, idx)
    if fast is not None:
        return fast
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    fuse = type(decoder).__name__ == "Fuse"  # the decoded text is the token strings joined: no decode needed
    full = None if fuse else decode(tokenizer, ids)
    joined = lens = None
    if getattr(tokenizer, "convert_ids_to_tokens", None) is not None:
        # token strings that are the text itself (character-level vocabularies): no decoding
        table = vocab_table(tokenizer, "text")
        if table is not None and (not ids or (int(idx.max()) < table.size and int(idx.min()) >= 0)):
            joined, lens = table.text(ids, idx)
    if fuse and joined is not None:
        full = joined
    elif full is None:
        full = decode(tokenizer, ids)
    if (joined is None or joined != full) and text is not None and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:  # the text hint re-encodes to the ids: its offset mapping
            off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            return text, _contiguous_array(off[:, 0], off[:, 1], 0, len(text))
    if joined is None or joined != full:
        pieces = [decode(tokenizer, [t]) for t in ids]
        lens = np.asarray([len(p) for p in pieces], dtype=np.int64)
        joined = "".join(pieces)
    if joined == full:
        ends = np.cumsum(lens) if len(lens) else np.zeros(0, dtype=np.int64)
        return full, _contiguous_array(ends - lens, ends, 0, len(full))
    spans: List[Optional[Span]] = []
    committed, pending = 0, 0
    for i in range(len(ids)):
        cur = decode(tokenizer, ids[:i + 1])
        pending += 1
        if cur.endswith("\ufffd") and i + 1 < len(ids):
            continue  # a partial multi-byte character: the following token completes it
        end = len(cur)
        spans.extend([(committed, end)] * pending)
        committed, pending = end, 0
    arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return full, _contiguous_array(arr[:, 0], arr[:, 1], 0, len(full))


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``) inverted: character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level_offsets(tokenizer, ids: List[int], idx: np.ndarray) -> Optional[Tuple[str, np.ndarray]]:
    """Offsets of a byte-level BPE tokenizer (GPT-2, Qwen, Llama-3) from its token bytes, without
    re-encoding: each token's bytes through the byte alphabet, character positions from the UTF-8
    lead bytes. A token made only of continuation bytes (the rest of a character split over tokens)
    gets an empty span after the token that starts the character. ``None`` when the tokenizer is not
    byte-level or the bytes do not decode to what the tokenizer decodes (then the general path runs)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel" or not ids:
        return None
    table = vocab_table(tokenizer, "bytes")
    if table is None or int(idx.max()) >= table.size or int(idx.min()) < 0:
        return None
    raw = table.bytes(ids, idx)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    base = getattr(tokenizer, "vocab_size", None)
    plain = isinstance(base, int) and int(idx.max()) < base  # no added token: the bytes are what the decoder yields
    if not plain and text != decode(tokenizer, ids):
        return None
    lead = (np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80
    chars = np.concatenate([[0], np.cumsum(lead)])
    lens = table.lengths[idx]
    ends = np.cumsum(lens)
    return text, _contiguous_array(chars[ends - lens], chars[ends], 0, len(text))


def overlap(a: Span, b: Span) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def assign_steps_array(spans: np.ndarray, steps: np.ndarray, has_text: Optional[np.ndarray] = None,
                       row_offsets: Optional[np.ndarray] = None) -> np.ndarray:
    """For each token, the step (index into ``steps``) it overlaps most, or -1 when it overlaps none
    (``spans`` ``[n, 2]``, ``steps`` ``[K, 2]``, sorted; vectorised over tokens: int64 ``[n]``).

    A token whose characters fall in two steps belongs to the step holding most of them (the earlier
    one on a tie). A token with an empty span that has text (``has_text[i]``: a byte-level BPE piece
    of a character the token before it started) belongs to the step of the token before it (of the
    token after it when it leads the response, as a SentencePiece "▁" that decodes to nothing there).
    A token without text (a special token) joins a step only when it lies strictly inside it. Spans
    are sorted, so each step's tokens form one contiguous run. ``row_offsets`` ``[B + 1]``: the tokens are
    many rows laid end to end (and their spans and steps in disjoint, increasing character ranges): each
    row is assigned on its own. ``tests/reference_layout.py`` holds the list version (the oracle)."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    steps = np.asarray(steps, dtype=np.int64).reshape(-1, 2)
    n, K = spans.shape[0], steps.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return out
    a, b = spans[:, 0], spans[:, 1]
    s0, s1 = steps[:, 0], steps[:, 1]
    k = np.searchsorted(s1, a, side="right")  # the first step ending after the token's start
    empty = b <= a
    if K:
        best_ov = np.zeros(n, dtype=np.int64)
        j = 0
        while True:  # the candidate steps of each token, one offset at a time (tokens rarely span two)
            kk = k + j
            kc = np.minimum(kk, K - 1)
            valid = ~empty & (kk < K) & (s0[kc] < b)
            if not valid.any():
                break
            ov = np.minimum(b, s1[kc]) - np.maximum(a, s0[kc])
            better = valid & (ov > best_ov)
            out = np.where(better, kc, out)
            best_ov = np.where(better, ov, best_ov)
            j += 1
        kc = np.minimum(k, K - 1)
        inside = empty & (k < K) & (s0[kc] < a) & (a < s1[kc])  # no text: strictly inside a step
        out = np.where(inside, kc, out)
    if has_text is not None:
        cont = empty & np.asarray(has_text, dtype=bool)
        if cont.any():
            anchor = np.maximum.accumulate(np.where(cont, -1, np.arange(n)))
            # leading ones (nothing before them in their row): the first token after them
            if row_offsets is None:
                first = int(np.argmin(cont)) if not cont.all() else -1
                anchor = np.where(anchor < 0, first, anchor)
            else:
                off = np.asarray(row_offsets, dtype=np.int64)
                rs = np.repeat(off[:-1], np.diff(off))
                starts = off[:-1][np.diff(off) > 0]
                first = np.minimum.reduceat(np.where(cont, n, np.arange(n)), starts)  # n: none in the row
                first_of = np.full(off.size - 1, -1, dtype=np.int64)
                first_of[np.diff(off) > 0] = np.where(first < n, first, -1)
                anchor = np.where(anchor < rs, first_of[row_of(off)], anchor)
            out = np.where(cont, np.where(anchor >= 0, out[np.maximum(anchor, 0)], -1), out)
    return out


def special_ids(tokenizer) -> set:
    """Ids of the tokenizer's special tokens (tokens without text of their own)."""
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def overlap_map(src: Sequence[Span], dst: Sequence[Span]) -> List[Tuple[int, int, float]]:
    """Triplets ``(src_index, dst_index, weight)``: each source token's mass split over the
    destination tokens in proportion to the characters they share. Weights of a source token sum to 1
    (a source token sharing no character goes whole to the destination token at its position), so
    attribution mass is preserved exactly."""
    out: List[Tuple[int, int, float]] = []
    if not dst:
        return out
    starts = [s[0] for s in dst]
    j0 = 0
    for i, s in enumerate(src):
        while j0 < len(dst) and dst[j0][1] <= s[0] and dst[j0][1] > dst[j0][0]:
            j0 += 1
        parts, total = [], 0
        j = j0
        while j < len(dst) and dst[j][0] < s[1]:
            ov = overlap(s, dst[j])
            if ov:
                parts.append((j, ov))
                total += ov
            j += 1
        if total == 0:
            import bisect
            j = min(max(bisect.bisect_right(starts, s[0]) - 1, 0), len(dst) - 1)
            out.append((i, j, 1.0))
        else:
            out.extend((i, j, ov / total) for j, ov in parts)
    return out


# ------------------------------------------------------------------ many rows at once
def row_of(off: np.ndarray) -> np.ndarray:
    """The row of every element of rows laid end to end with offsets ``off`` ``[B + 1]``."""
    return np.repeat(np.arange(off.size - 1), np.diff(off))


def within(counts: np.ndarray) -> np.ndarray:
    """0..n-1 for every count n of ``counts``, laid end to end (each element's place in its row)."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def contiguous_rows(a: np.ndarray, b: np.ndarray, off: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """:func:`_contiguous_array` on many rows at once: tokens laid end to end (row ``r`` holds tokens
    ``off[r]:off[r + 1]`` whose spans lie in ``[0, lengths[r])``); ``[n, 2]`` int64, row-local."""
    n = a.size
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    row = row_of(off)
    base = np.concatenate([[0], np.cumsum(lengths)])[:-1]  # rows laid end to end in character space too
    lo, hi = base[row], (base + lengths)[row]
    a, b = a + lo, b + lo
    text = b > a
    e = np.where(text, np.minimum(b, hi), lo)
    starts = off[:-1][np.diff(off) > 0]
    last = np.maximum.reduceat(np.where(text, np.arange(n), -1), starts)  # the row's last token with text
    last = last[last >= 0]
    e[last] = hi[last]  # it reaches the end of its row
    prev = np.concatenate([[0], e[:-1]])
    prev[starts] = lo[starts]  # every row starts at its own beginning (earlier rows end at or before it)
    s = np.maximum.accumulate(prev)
    return np.stack([s, np.maximum(s, e)], axis=1) - lo[:, None]


def offsets_many(tokenizer, flat: np.ndarray, off: np.ndarray) -> Tuple[List[str], np.ndarray]:
    """:func:`offsets_array` of many id rows laid end to end (``flat``, row offsets ``off``): the decoded
    texts and the ``[n, 2]`` row-local spans. Byte-level BPE and character vocabularies gather every
    row's token bytes / texts at once from the per-tokenizer table; rows they do not decode (and every
    row of other tokenizers) go through :func:`offsets_of` one by one."""
    B, n = off.size - 1, flat.size
    texts: List[Optional[str]] = [None] * B
    a = np.zeros(n, dtype=np.int64)
    b = np.zeros(n, dtype=np.int64)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    kind = type(decoder).__name__
    table = None
    if kind == "ByteLevel":
        table = vocab_table(tokenizer, "bytes")
    elif getattr(tokenizer, "convert_ids_to_tokens", None) is not None:
        table = vocab_table(tokenizer, "text")
    if table is not None and (table.flat is None or (n and (int(flat.min()) < 0 or int(flat.max()) >= table.size))):
        table = None
    if table is not None and n:
        buf, ln = table.gather(flat)
        ends = np.cumsum(ln)
        starts = ends - ln
        cut = np.concatenate([[0], ends])[off]  # where each row's bytes / code points start
        if kind == "ByteLevel":
            raw = buf.tobytes()
            lead = (buf & 0xC0) != 0x80
            chars = np.concatenate([[0], np.cumsum(lead)])
            ca, cb = chars[starts], chars[ends]
            base = getattr(tokenizer, "vocab_size", None)
            for r in range(B):
                try:
                    text = raw[cut[r]:cut[r + 1]].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                ids = flat[off[r]:off[r + 1]]
                if ids.size and not (isinstance(base, int) and int(ids.max()) < base) and \
                        text != decode(tokenizer, ids.tolist()):
                    continue
                texts[r] = text
            c0 = chars[cut]
        else:
            fuse = kind == "Fuse"
            ca, cb = starts, ends
            c0 = cut
            for r in range(B):
                text = buf[cut[r]:cut[r + 1]].tobytes().decode("utf-32-le")
                if fuse or text == decode(tokenizer, flat[off[r]:off[r + 1]].tolist()):
                    texts[r] = text
        row = row_of(off)
        a, b = ca - c0[row], cb - c0[row]
    spans = np.zeros((n, 2), dtype=np.int64)
    fast = np.asarray([t is not None for t in texts], dtype=bool)
    lengths = np.asarray([len(t) if t is not None else 0 for t in texts], dtype=np.int64)
    if fast.any():
        got = contiguous_rows(a, b, off, lengths)
        spans[:] = got
    for r in np.nonzero(~fast)[0]:  # one by one, as offsets_array does it
        ids = flat[off[r]:off[r + 1]]
        texts[r], spans[off[r]:off[r + 1]] = offsets_of(tokenizer, ids.tolist(), ids, None)
    return texts, spans
