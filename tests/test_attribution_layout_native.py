"""The native layout kernel (p2t_host::layout_ids, csrc/layout_cpu.cpp) against the NumPy layout it
replaces and the row-by-row layout that defines both: Python's whitespace, characters split over byte
tokens, bytes that are not UTF-8, the argument checks of the kernel."""
from __future__ import annotations

import random
import sys
import warnings

import numpy as np
import pytest
import torch

from p2t.ops import host

from reference_layout import reference_row

from _attribution_models import char_tokenizer, gpt2_tokenizer

pytestmark = pytest.mark.skipif(not host.has_layout(), reason="p2t._C is not built with the layout kernel")

# every code point Python's str.strip removes, and look-alikes it keeps
SPACES = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
NOT_SPACES = ["\u200b", "\u180e", "\ufeff", "\u2060", "\x00", "\u00ad", "x"]
FIELDS = ("input_ids", "token_step", "readout", "map_prm", "map_policy", "policy_step", "policy_spans")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return gpt2_tokenizer(str(tmp_path_factory.mktemp("gpt2")))


def _layout(tok, **kw):
    from p2t.attribution.layout import Layout
    o = dict(template="{prompt}\n{response}", add_special_tokens=False, step_separator="\n", separator_suffix="",
             step_split="\n", read_at="separator", max_length=None, truncation="steps")
    o.update(kw)
    return Layout(tok, tok, True, system_prompt=None, **o)


def _three_ways(lay, prompts, ids, monkeypatch):
    """(native rows, NumPy rows, row-by-row rows); the native path must have run."""
    parts = lay.template_parts_many(prompts)
    from p2t.attribution.layout import _flatten_ids
    flat, n_b = _flatten_ids(ids)
    off = np.concatenate([[0], np.cumsum(n_b)])
    assert lay._rows_native(prompts, parts, flat, off, 2) is not None
    native = lay.rows(prompts, None, ids, hint=False, skip_empty=True)
    with monkeypatch.context() as m:
        m.setattr(host, "has_layout", lambda: False)
        numpy_rows = lay.rows(prompts, None, ids, hint=False, skip_empty=True)
    by_row = [reference_row(lay, i, lay.template_parts(p), None, ids[i], hint=False, skip_empty=True)
              for i, p in enumerate(prompts)]
    return native, numpy_rows, by_row


def _assert_same(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert (a.index, a.prompt_length, a.steps, a.text, a.map_weight) == \
            (b.index, b.prompt_length, b.steps, b.text, b.map_weight)
        for f in FIELDS:
            assert np.array_equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("split", ["\n", "\n\n", None])
def test_whitespace_is_what_python_strips(gpt2, split, monkeypatch):
    """Steps are trimmed of exactly the code points str.strip removes (all 29 of Python's whitespace, and
    none of the look-alikes), with multi-byte characters on both sides of every step boundary."""
    lay = _layout(gpt2, step_split=split, read_at="last" if split is None else "separator")
    texts = []
    for c in SPACES + NOT_SPACES:
        texts.append(f"{c}a{c}\n{c}日{c}{c}\n\n{c}é b{c}")
        texts.append(f"{c}{c}\n{c}")
    ids = [gpt2.encode(t) for t in texts]
    native, numpy_rows, by_row = _three_ways(lay, ["Q: ü?"] * len(ids), ids, monkeypatch)
    _assert_same(native, by_row)
    _assert_same(numpy_rows, by_row)
    # the texts decoded from the ids are the texts, and steps are the str.split / str.strip pieces
    for r, t in zip(native, texts):
        if r is not None:
            assert r.text == t
            want = [p.strip() for p in ([t] if split is None else t.split(split)) if p.strip()]
            assert [t[a:b] for a, b in r.steps] == want


def test_random_rows_with_specials_and_truncation(monkeypatch):
    """Random ids of a character vocabulary (code points, not bytes), specials anywhere, truncation and
    several separators: the three layouts agree, warnings included."""
    tok = char_tokenizer()
    rng = random.Random(7)
    specials = sorted(set(tok.all_special_ids))
    for kw in [dict(), dict(max_length=30), dict(step_separator="\n\n", separator_suffix="\n", step_split="\n\n"),
               dict(template="{prompt} {response} end", add_special_tokens=True)]:
        lay = _layout(tok, **kw)
        for _ in range(6):
            B = rng.randint(1, 9)
            ids = []
            for _ in range(B):
                n = rng.randint(0, 60)
                row = [rng.randrange(len(tok)) for _ in range(n)]
                nl = tok.convert_tokens_to_ids("\n")
                for j in range(0, n, 7):
                    row[j] = nl
                if row and rng.random() < 0.5:
                    row.insert(rng.randint(0, len(row)), rng.choice(specials))
                ids.append(row)
            prompts = [rng.choice(["q", "What is 2+2?", ""]) for _ in range(B)]
            seen = []
            for build in ("native", "numpy"):
                with warnings.catch_warnings(record=True) as w, monkeypatch.context() as m:
                    warnings.simplefilter("always")
                    if build == "numpy":
                        m.setattr(host, "has_layout", lambda: False)
                    try:
                        got = lay.rows(prompts, None, ids, hint=False, skip_empty=True)
                    except ValueError as e:
                        got = str(e)
                seen.append((got, [str(x.message) for x in w]))
            (a, wa), (b, wb) = seen
            assert wa == wb
            if isinstance(a, str):
                assert a == b
            else:
                _assert_same(a, b)


def test_bytes_that_are_not_utf8_take_the_general_path(gpt2, monkeypatch):
    """A response cut inside a multi-byte character (sampling stopped there) is not UTF-8: the native
    layout declines the call and the general path lays it out, as row by row."""
    cut = gpt2.encode("ok\n日本")[:-1]
    ids = [gpt2.encode("a\nb"), cut]
    lay = _layout(gpt2)
    parts = lay.template_parts_many(["p", "p"])
    from p2t.attribution.layout import _flatten_ids
    flat, n_b = _flatten_ids(ids)
    assert lay._rows_native(["p", "p"], parts, flat, np.concatenate([[0], np.cumsum(n_b)]), 2) is None
    rows = lay.rows(["p", "p"], None, ids, hint=False, skip_empty=True)
    _assert_same(rows, [reference_row(lay, i, lay.template_parts("p"), None, x, hint=False, skip_empty=True)
                        for i, x in enumerate(ids)])


def test_kernel_checks_its_arguments():
    L = torch.int64
    table = host.piece_table_entries([0, 1, 2], [1, 1, 0], [False, False, True])
    args = dict(ids=torch.tensor([0, 1, 5]), offsets=torch.tensor([0, 3]),
                pieces=torch.tensor([97, 98], dtype=torch.int32), table=table,
                split=torch.tensor([10], dtype=torch.int32), frame=torch.zeros(0, dtype=L),
                frame_offsets=torch.tensor([0, 0, 0]), row_frame=torch.tensor([0]), separator=torch.tensor([1]))
    op = torch.ops.p2t_host.layout_ids
    with pytest.raises(RuntimeError, match=r"ids\[2\] = 5 is outside the table \[0, 3\)"):
        op(*args.values(), 1, -1, False)
    args["ids"] = torch.tensor([0, 1, 1, 2])
    args["offsets"] = torch.tensor([0, 4])
    bad = dict(args, offsets=torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="offsets must run from 0 to ids.numel"):
        op(*bad.values(), 1, -1, False)
    bad = dict(args, split=torch.tensor([10]))
    with pytest.raises(RuntimeError, match="split must be a contiguous 1-D int32"):
        op(*bad.values(), 1, -1, False)
    bad = dict(args, row_frame=torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"row_frame\[0\] is outside"):
        op(*bad.values(), 1, -1, False)
    bad = dict(args, table=host.piece_table_entries([0, 1, 2], [1, 2, 0], [False, False, True]))
    with pytest.raises(RuntimeError, match=r"table\[1\] points outside pieces"):
        op(*bad.values(), 1, -1, False)
    with pytest.raises(RuntimeError, match="separator_readout"):
        op(*args.values(), 2, -1, False)
    assert host.piece_table_entries([0], [1 << 16], [False]) is None
    out = op(*args.values(), 1, -1, False)
    assert out[0].tolist() == [97, 98, 98] and out[3].tolist() == [[0, 3]]  # the special token adds no text
    # ids with text and the separator; read at the separator; the special token (no text) is inside no step
    assert out[9].tolist() == [0, 1, 1, 1] and out[12].tolist() == [3] and out[5].tolist() == [0, 0, 0, -1]


def test_added_tokens_of_a_byte_level_tokenizer(tmp_path, monkeypatch):
    """Tokens added to a byte-level vocabulary (a plain one, a special one) decode to their own text: the
    native layout checks that against the tokenizer's decoding and agrees with the NumPy and row-by-row
    layouts. An added token whose text the byte-level decoder garbles ("ünï" decodes to "\ufffdn\ufffd")
    sends the call to the general path, which follows the tokenizer's decoding."""
    tok = gpt2_tokenizer(str(tmp_path / "g"))
    tok.add_tokens(["<step>", "ünï"])
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    step, uni, extra = tok.convert_tokens_to_ids(["<step>", "ünï", "<extra_0>"])
    lay = _layout(tok)
    a, b = tok.encode("x = 1\ny = 2"), tok.encode("ok\nfine")
    ids = [a[:3] + [step] + a[3:], b + [extra], a + [extra] + b]
    native, numpy_rows, by_row = _three_ways(lay, ["p"] * 3, ids, monkeypatch)
    _assert_same(native, by_row)
    _assert_same(numpy_rows, by_row)
    assert native[0].text == "x = 1<step>\ny = 2" == tok.decode(ids[0], skip_special_tokens=True)
    ids.append([uni] + b)
    from p2t.attribution.layout import _flatten_ids
    flat, n_b = _flatten_ids(ids)
    assert lay._rows_native(["p"] * 4, lay.template_parts_many(["p"] * 4), flat,
                            np.concatenate([[0], np.cumsum(n_b)]), 2) is None
    rows = lay.rows(["p"] * 4, None, ids, hint=False, skip_empty=True)
    _assert_same(rows, [reference_row(lay, i, lay.template_parts("p"), None, x, hint=False, skip_empty=True)
                        for i, x in enumerate(ids)])
    assert rows[3].text == tok.decode(ids[3], skip_special_tokens=True)
