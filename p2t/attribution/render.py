"""Views of a :class:`ScoredBatch` for people: a coloured terminal heatmap and a self-contained HTML page.

Each response is shown token by token (policy tokens) with every step closed by a marker giving its
reward R_s. Two quantities can colour a token: the attribution I (what the PRM's gradient says about the
token) and the token reward r_i that a trainer uses (:func:`p2t.rewards.token_rewards` under a
:class:`p2t.P2TOptions`: the mode, ω, ω⁻, τ, standardize, normalize). Green is positive, red negative,
intensity relative to the response's largest absolute value. Tokens in no step (separators, whitespace
between steps) are uncoloured. The terminal shows one of them (``show=``); the HTML page carries both and
switches between them with a toggle (inline CSS and a few lines of inline script; no external resource).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..options import P2TOptions
from ..rewards import get_mode, token_rewards
from .batch import ScoredBatch

__all__ = ["SHOW", "terminal_heatmap", "html_report", "legend", "token_table"]

SHOW = ("attribution", "rewards")
"""What colours the tokens: the attribution I or the token reward r_i."""

_POS = (46, 40, 34, 28, 22)    # 256-colour greens, strongest first
_NEG = (196, 160, 124, 88, 52)  # reds

# the token reward of each registered mode, as the legend states it (a mode without an entry is named only)
FORMULAS: Dict[str, str] = {
    "outcome": "r_i = 0 (the outcome advantage alone)",
    "process": "r_i = R_s on every token of step s",
    "p2t": "r_i = R_s + ω·R_s·softmax_{j∈s}(I_j/τ)_i − ω⁻·(1 − R_s)·softmax_{j∈s}(−I_j/τ)_i",
}


@dataclass(frozen=True)
class Token:
    text: str
    attribution: float      # I
    reward: float           # r_i
    step: int               # step within the response, -1: in no step


def token_table(batch: ScoredBatch, options: Optional[P2TOptions] = None) -> List[List[Token]]:
    """Per response, its policy tokens with their attribution I, token reward r_i (under ``options``,
    default :class:`p2t.P2TOptions`'s) and step."""
    opts = P2TOptions.build(options)
    r = token_rewards(batch, opts).float().cpu()
    out = []
    for b, view in enumerate(batch.prm):
        if view is None:
            out.append([])
            continue
        n = int(batch.response_mask[b].sum())
        scores = batch.scores[b, :n].float().cpu().tolist()
        seg = batch.segment_ids[b, :n].cpu().tolist()
        first = sum(batch.steps_per_response[:b])
        out.append([Token(view.response_text[a:e], s, float(r[b, i]), (g - first) if g >= 0 else -1)
                    for i, ((a, e), s, g) in enumerate(zip(view.policy_spans, scores, seg))])
    return out


def legend(options: Optional[P2TOptions] = None, *, show: Optional[str] = None) -> str:
    """One line: the token-reward formula of the options' mode and the option values used."""
    o = P2TOptions.build(options)
    formula = FORMULAS.get(o.mode, f"r_i: the token rewards of mode {o.mode!r}")
    notes = []
    if get_mode(o.mode).needs_attributions:          # the options that shape a redistribution
        notes += ["I standardized within each step"] * o.standardize + ["divided by n_s + ω"] * (o.normalize == "sum")
    head = f"shown: {'token rewards r_i' if show == 'rewards' else 'attributions I'}; " if show else ""
    return (f"{head}{formula}{' (' + '; '.join(notes) + ')' if notes else ''}; mode {o.mode}, ω={o.omega:g}, "
            f"ω⁻={o.omega_neg:g}, τ={o.temperature:g}, normalize {o.normalize}, null {o.null}, method {o.method}")


def _level(value: float, scale: float) -> int:
    if scale <= 0:
        return 0
    return min(4, int(abs(value) / scale * 4.999))


def _check_show(show: str) -> str:
    if show not in SHOW:
        raise ValueError(f"show must be one of {', '.join(map(repr, SHOW))}, got {show!r}")
    return show


def terminal_heatmap(batch: ScoredBatch, prompts: Optional[Sequence[str]] = None, color: bool = True, *,
                     show: str = "attribution", options: Optional[P2TOptions] = None) -> str:
    """The batch as text with ANSI colours (``color=False``: the values in brackets instead), coloured by
    the attribution I (``show="attribution"``) or the token reward r_i (``show="rewards"``, under
    ``options``); the first line is the legend."""
    key = "reward" if _check_show(show) == "rewards" else "attribution"
    rewards = batch.segment_rewards.float().cpu().tolist()
    out: List[str] = [legend(options, show=show), ""]
    for b, toks in enumerate(token_table(batch, options)):
        vals = [getattr(t, key) for t in toks]
        scale = max((abs(v) for v, t in zip(vals, toks) if t.step >= 0), default=0.0)
        first = sum(batch.steps_per_response[:b])
        out.append(f"── response {b}" + (f": {prompts[b]!r}" if prompts is not None else ""))
        last = _last_token_of_step(toks)
        line = []
        for i, (t, v) in enumerate(zip(toks, vals)):
            shown = t.text.replace("\n", "↵\n") if t.text.strip() == "" and "\n" in t.text else t.text
            if t.step < 0:
                line.append(shown)
            elif not color:
                line.append(f"{shown}[{v:+.2f}]")
            else:
                lv = _level(v, scale)
                code = (_POS if v >= 0 else _NEG)[4 - lv] if lv else 236
                fg = 16 if lv >= 3 else 255
                line.append(f"\x1b[48;5;{code}m\x1b[38;5;{fg}m{shown}\x1b[0m")
            if t.step >= 0 and last[t.step] == i:
                line.append(_step_mark(t.step, rewards[first + t.step], color))
        out.append("".join(line))
        out.append("")
    return "\n".join(out)


def _last_token_of_step(toks: Sequence[Token]) -> dict:
    return {t.step: i for i, t in enumerate(toks) if t.step >= 0}


def _step_mark(k: int, reward: float, color: bool) -> str:
    text = f" ⟦step {k} R={reward:.2f}⟧"
    return f"\x1b[1;36m{text}\x1b[0m" if color else text


def _rgba(value: float, scale: float) -> str:
    if scale <= 0:
        return "transparent"
    a = min(1.0, abs(value) / scale)
    return f"rgba(22,163,74,{a:.3f})" if value >= 0 else f"rgba(220,38,38,{a:.3f})"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
    ".resp{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}"
    ".prompt{color:#555;margin-bottom:.5em}.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.8}"
    ".step{border-bottom:2px solid #2563eb}.tok{border-radius:2px}"
    ".reward{font-size:.8em;background:#2563eb;color:#fff;border-radius:3px;padding:0 .3em;margin:0 .3em}"
    ".legend span{padding:0 .4em;margin-right:.5em}.formula{font-family:monospace}"
    ".toggle label{margin-right:1em;cursor:pointer}"
    "body.show-attribution .tok{background:var(--i)}body.show-rewards .tok{background:var(--r)}"
    "body.show-attribution .only-rewards,body.show-rewards .only-attribution{display:none}"
)
# the toggle: radio buttons set the body's class; ?show=rewards (or #rewards) in the address opens that view
_SCRIPT = (
    "(function(){var b=document.body;function set(v){b.className='show-'+v;"
    "var r=document.getElementById('show-'+v);if(r){r.checked=true;}}"
    "var q=new URLSearchParams(location.search).get('show')||location.hash.slice(1);"
    "if(q==='rewards'||q==='attribution'){set(q);}"
    "document.querySelectorAll('input[name=show]').forEach(function(e){"
    "e.addEventListener('change',function(){set(e.value);});});})();"
)


def html_report(batch: ScoredBatch, prompts: Optional[Sequence[str]] = None, title: str = "p2t attribution", *,
                options: Optional[P2TOptions] = None, show: str = "attribution") -> str:
    """A self-contained HTML page (inline CSS and script, no external resource): every token carries its
    attribution I and its token reward r_i (under ``options``); a toggle picks which one colours the tokens
    (``show``: the initial view; ``?show=rewards`` in the address opens that one). The legend states the
    token-reward formula and the options used."""
    _check_show(show)
    opts = P2TOptions.build(options)
    rewards = batch.segment_rewards.float().cpu().tolist()
    checked = {v: " checked" if v == show else "" for v in SHOW}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>",
        f"<body class='show-{show}'>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='toggle'>Colour tokens by: "
        f"<label><input type='radio' name='show' id='show-attribution' value='attribution'{checked['attribution']}>"
        " attribution I</label>"
        f"<label><input type='radio' name='show' id='show-rewards' value='rewards'{checked['rewards']}>"
        " token reward r<sub>i</sub></label></p>",
        f"<p>method <b>{html.escape(batch.method)}</b>, objective <b>{html.escape(batch.objective)}</b>. "
        "<span class='only-attribution'>Token colour: attribution I (green raises the step reward, red lowers "
        "it).</span><span class='only-rewards'>Token colour: the token reward r<sub>i</sub> a trainer uses "
        "(green positive, red negative).</span> Intensity is relative to the response's largest absolute "
        "value. Each step is underlined and closed by its reward R<sub>s</sub>; hover a token for both "
        "values.</p>",
        f"<p class='formula'>{html.escape(legend(opts))}</p>",
        "<p class='legend'><span style='background:rgba(22,163,74,.8)'>positive</span>"
        "<span style='background:rgba(220,38,38,.8)'>negative</span></p>",
    ]
    for b, toks in enumerate(token_table(batch, opts)):
        in_step = [t for t in toks if t.step >= 0]
        scale_i = max((abs(t.attribution) for t in in_step), default=0.0)
        scale_r = max((abs(t.reward) for t in in_step), default=0.0)
        first = sum(batch.steps_per_response[:b])
        parts.append("<div class='resp'>")
        if prompts is not None:
            parts.append(f"<div class='prompt'><b>Prompt:</b> {html.escape(prompts[b])}</div>")
        parts.append("<div class='tokens'>")
        last = _last_token_of_step(toks)
        open_step = None
        for i, t in enumerate(toks):
            k = t.step
            if k >= 0 and open_step is None:
                parts.append(f"<span class='step' title='step {k}'>")
                open_step = k
            if k >= 0:
                tip = f"I={t.attribution:+.4f} r={t.reward:+.4f} (step {k}, R={rewards[first + k]:.4f})"
                style = f"--i:{_rgba(t.attribution, scale_i)};--r:{_rgba(t.reward, scale_r)}"
            else:
                tip, style = "in no step", "--i:transparent;--r:transparent"
            parts.append(f"<span class='tok' style='{style}' data-i='{t.attribution:.6g}' data-r='{t.reward:.6g}' "
                         f"title='{html.escape(tip)}'>{html.escape(t.text)}</span>")
            if k >= 0 and last[k] == i:
                parts.append(f"</span><span class='reward'>R={rewards[first + k]:.2f}</span>")
                open_step = None
        parts.append("</div></div>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "".join(parts)
