"""Views of a :class:`ScoredBatch` for people: a coloured terminal heatmap and a self-contained HTML page.

Each response is shown token by token (policy tokens), coloured by attribution (green positive, red
negative, intensity relative to the response's largest |score|), with every step closed by a marker
giving its reward R_s. Tokens in no step (separators, whitespace between steps) are uncoloured.
"""
from __future__ import annotations

import html
from typing import List, Optional, Sequence

from .scorer import ScoredBatch

_POS = (46, 40, 34, 28, 22)    # 256-colour greens, strongest first
_NEG = (196, 160, 124, 88, 52)  # reds


def _tokens(batch: ScoredBatch, b: int):
    """(text, score, step) per policy token of response b."""
    view = batch.prm[b]
    n = int(batch.response_mask[b].sum())
    scores = batch.scores[b, :n].float().cpu().tolist()
    seg = batch.segment_ids[b, :n].cpu().tolist()
    first = sum(batch.steps_per_response[:b])
    return [(view.response_text[a:e], s, (g - first) if g >= 0 else -1)
            for (a, e), s, g in zip(view.policy_spans, scores, seg)]


def _level(score: float, scale: float) -> int:
    if scale <= 0:
        return 0
    return min(4, int(abs(score) / scale * 4.999))


def terminal_heatmap(batch: ScoredBatch, prompts: Optional[Sequence[str]] = None, color: bool = True) -> str:
    """The batch as text with ANSI colours (``color=False``: scores in brackets instead)."""
    out: List[str] = []
    rewards = batch.segment_rewards.float().cpu().tolist()
    for b in range(len(batch.prm)):
        toks = _tokens(batch, b)
        scale = max((abs(s) for _, s, _ in toks), default=0.0)
        first = sum(batch.steps_per_response[:b])
        out.append(f"── response {b}" + (f": {prompts[b]!r}" if prompts is not None else ""))
        last = _last_token_of_step(toks)
        line = []
        for i, (text, s, k) in enumerate(toks):
            shown = text.replace("\n", "↵\n") if text.strip() == "" and "\n" in text else text
            if k < 0:
                line.append(shown)
            elif not color:
                line.append(f"{shown}[{s:+.2f}]")
            else:
                lv = _level(s, scale)
                code = (_POS if s >= 0 else _NEG)[4 - lv] if lv else 236
                fg = 16 if lv >= 3 else 255
                line.append(f"\x1b[48;5;{code}m\x1b[38;5;{fg}m{shown}\x1b[0m")
            if k >= 0 and last[k] == i:
                line.append(_step_mark(k, rewards[first + k], color))
        out.append("".join(line))
        out.append("")
    return "\n".join(out)


def _last_token_of_step(toks) -> dict:
    return {k: i for i, (_, _, k) in enumerate(toks) if k >= 0}


def _step_mark(k: int, reward: float, color: bool) -> str:
    text = f" ⟦step {k} R={reward:.2f}⟧"
    return f"\x1b[1;36m{text}\x1b[0m" if color else text


def _rgba(score: float, scale: float) -> str:
    if scale <= 0:
        return "transparent"
    a = min(1.0, abs(score) / scale)
    return f"rgba(22,163,74,{a:.3f})" if score >= 0 else f"rgba(220,38,38,{a:.3f})"


def html_report(batch: ScoredBatch, prompts: Optional[Sequence[str]] = None, title: str = "p2t attribution") -> str:
    """A self-contained HTML page (inline CSS, no scripts or external resources)."""
    rewards = batch.segment_rewards.float().cpu().tolist()
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        ".resp{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}"
        ".prompt{color:#555;margin-bottom:.5em}.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.8}"
        ".step{border-bottom:2px solid #2563eb}.tok{border-radius:2px}"
        ".reward{font-size:.8em;background:#2563eb;color:#fff;border-radius:3px;padding:0 .3em;margin:0 .3em}"
        ".legend span{padding:0 .4em;margin-right:.5em}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>method <b>{html.escape(batch.method)}</b>, objective <b>{html.escape(batch.objective)}</b>. "
        "Token colour: attribution (green raises the step reward, red lowers it; intensity relative to the "
        "response's largest |attribution|). Each step is underlined and closed by its reward R.</p>",
        "<p class='legend'><span style='background:rgba(22,163,74,.8)'>positive</span>"
        "<span style='background:rgba(220,38,38,.8)'>negative</span></p>",
    ]
    for b in range(len(batch.prm)):
        toks = _tokens(batch, b)
        scale = max((abs(s) for _, s, _ in toks), default=0.0)
        first = sum(batch.steps_per_response[:b])
        parts.append("<div class='resp'>")
        if prompts is not None:
            parts.append(f"<div class='prompt'><b>Prompt:</b> {html.escape(prompts[b])}</div>")
        parts.append("<div class='tokens'>")
        last = _last_token_of_step(toks)
        open_step = None
        for i, (text, s, k) in enumerate(toks):
            if k >= 0 and open_step is None:
                parts.append(f"<span class='step' title='step {k}'>")
                open_step = k
            tip = f"{s:+.4f}" + (f" (step {k})" if k >= 0 else "")
            parts.append(f"<span class='tok' style='background:{_rgba(s, scale) if k >= 0 else 'transparent'}' "
                         f"title='{html.escape(tip)}'>{html.escape(text)}</span>")
            if k >= 0 and last[k] == i:
                parts.append(f"</span><span class='reward'>R={rewards[first + k]:.2f}</span>")
                open_step = None
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)
