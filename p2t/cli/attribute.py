"""`p2t attribute`: per-token PRM attributions and token rewards as a terminal heatmap and a self-contained
HTML file.

    p2t attribute                                     # the toy lab's PRM on the shipped sample
    p2t attribute --show rewards --omega 0.6 --omega-neg 0.6 --null zero
    p2t attribute answers.jsonl --prm Qwen/Qwen2.5-Math-PRM-7B --kind step_classifier --html out.html

Input: a JSONL file of ``{"prompt": ..., "response": ...}`` objects (an optional ``"reference"``
solution is used by the embedded MiniLM reward); by default the sample shipped with the package.
PRM: a path or hub id (``--prm``, with ``--kind``); ``--prm lab`` (the default): the toy lab's step
classifier (shipped with the package, read with the lab's layout: ``BOS prompt line\n line\n ...``);
``--prm minilm``: the embedded MiniLM similarity reward (real pretrained weights; reads any text).
``--image``: an image file read with every prompt (records may name their own ``"image"``) by a
vision-language PRM (:class:`p2t.attribution.multimodal.MultimodalP2TScorer`).

Tokens are coloured by the attribution I (``--show attribution``, the default) or by the token reward r_i a
trainer would use (``--show rewards``) under the options ``--mode``, ``--omega``, ``--omega-neg``,
``--temperature``, ``--standardize``, ``--normalize`` (:class:`p2t.P2TOptions`); the HTML page has both
and a toggle, and its legend states the formula and the options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from p2t.options import DEFAULTS, METHODS, MODES, NORMALIZE, NULLS, P2TOptions

from .checks import ArgumentError, check_file, check_model, check_output, loading

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SAMPLE = os.path.join(DATA, "attribute_sample.jsonl")
LAB_SAMPLE = os.path.join(DATA, "attribute_lab_sample.jsonl")
BUILT_IN = ("lab", "minilm")   # --prm values that are not paths


def _unescape(text):
    return None if text is None else text.encode("utf-8").decode("unicode_escape")


def _null(text):
    return int(text) if str(text).lstrip("-").isdigit() else text


def configure(parser):
    import p2t.rewards  # noqa: F401  (fills the mode registry)
    from p2t.attribution.heads import KINDS
    from p2t.attribution.render import SHOW
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    parser.add_argument("input", nargs="?", default=None,
                        help="JSONL of {prompt, response[, reference]} objects (default: the shipped sample for "
                             "the PRM)")
    parser.add_argument("--prm", default="lab",
                        help="PRM path or hub id; 'lab' (default): the toy lab's PRM; 'minilm': the embedded MiniLM "
                             "similarity reward")
    parser.add_argument("--kind", default=KINDS[0], choices=KINDS)
    parser.add_argument("--tokenizer", default=None, help="PRM tokenizer path when it is not next to the model")
    parser.add_argument("--policy-tokenizer", default=None, help="policy tokenizer path (default: the PRM's)")
    parser.add_argument("--method", default=DEFAULTS.method, choices=METHODS)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--objective", default="logit", choices=["logit", "prob"])
    parser.add_argument("--null", default=DEFAULTS.null, type=_null,
                        help=f"null embedding: {', '.join(NULLS)} or a token id (default {DEFAULTS.null})")
    parser.add_argument("--step-split", default=None, help=r"text between steps, escapes allowed (e.g. '\n')")
    parser.add_argument("--separator", default=None, help="step separator inserted after each step")
    parser.add_argument("--template", default=None, help="'chat' or a string with {prompt} and {response}")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--show", default="attribution", choices=SHOW,
                        help="what colours the terminal's tokens: the attribution I (default) or the token reward "
                             "r_i under the options below (the HTML page has both, with a toggle)")
    group = parser.add_argument_group("token-reward options (p2t.P2TOptions)")
    group.add_argument("--mode", default=DEFAULTS.mode, choices=tuple(MODES))
    group.add_argument("--omega", type=float, default=DEFAULTS.omega, help=f"ω (default {DEFAULTS.omega})")
    group.add_argument("--omega-neg", type=float, default=DEFAULTS.omega_neg,
                       help=f"ω⁻, the signed blame term (default {DEFAULTS.omega_neg})")
    group.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                       help=f"τ of the within-step softmax (default {DEFAULTS.temperature})")
    group.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=DEFAULTS.standardize,
                       help="standardize I within each step before the softmax")
    group.add_argument("--normalize", default=DEFAULTS.normalize, choices=NORMALIZE)
    parser.add_argument("--html", default="attribution.html", help="HTML output file (default: attribution.html)")
    parser.add_argument("--no-color", action="store_true", help="values in brackets instead of ANSI colours")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--image", default=None,
                        help="image file read with every prompt by a vision-language PRM (a record's own \"image\" "
                             "path overrides it)")


def options_of(args) -> P2TOptions:
    """The :class:`p2t.P2TOptions` the command's flags name."""
    return P2TOptions.build(mode=args.mode, omega=args.omega, omega_neg=args.omega_neg,
                            temperature=args.temperature, standardize=args.standardize,
                            normalize=args.normalize, method=args.method, null=args.null)


def _read(path, limit):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("response"), str):
                raise ValueError(f"{path}:{n}: every line must be an object with string 'prompt' and 'response'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows[:limit] if limit else rows


def _check_args(args) -> None:
    """Paths and hub ids first: one line naming a bad one (exit 2), before any model is loaded."""
    check_file("input", args.input)
    check_file("--image", args.image)
    if args.prm not in BUILT_IN:
        check_model("--prm", args.prm)
    check_model("--tokenizer", args.tokenizer)
    check_model("--policy-tokenizer", args.policy_tokenizer)
    check_output("--html", args.html)


def run(args) -> int:
    _check_args(args)
    try:
        options = options_of(args)
        rows = _read(args.input or (LAB_SAMPLE if args.prm == "lab" else SAMPLE), args.limit)
        opts = dict(null=options.null, objective=args.objective, ig_steps=args.ig_steps)
        for key, value in (("step_split", _unescape(args.step_split)), ("step_separator", _unescape(args.separator)),
                           ("template", _unescape(args.template))):
            if value is not None:
                opts[key] = value
        prompts = [r["prompt"] for r in rows]
        kw = {}
        responses = [r["response"] for r in rows]
        if args.image and args.prm in BUILT_IN:
            raise ArgumentError(f"--image needs a vision-language PRM (--prm PATH); --prm {args.prm} reads text only")
        for r in rows:
            if r.get("image"):
                check_file(f"{args.input}: \"image\"", r["image"])
        with loading(prm=None if args.prm in BUILT_IN else args.prm, tokenizer=args.tokenizer,
                     policy_tokenizer=args.policy_tokenizer):
            scorer, name = _scorer(args, rows, opts, kw)
        batch = scorer.score(prompts, responses, method=options.method, **kw)
        # the token rewards under the options (the signed term needs the ops that implement it)
        from p2t.attribution.render import html_report, terminal_heatmap
        color = not args.no_color and "NO_COLOR" not in os.environ
        text = terminal_heatmap(batch, prompts, color=color, show=args.show, options=options)
        page = html_report(batch, prompts, title=f"p2t attribution: {name}", options=options, show=args.show)
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError) as e:
        print(f"p2t attribute: error: {e}", file=sys.stderr)
        return 2
    print(f"PRM: {name}; method: {options.method}; {len(rows)} responses, {sum(batch.steps_per_response)} steps\n")
    print(text)
    with open(args.html, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {args.html}")
    return 0


def _scorer(args, rows, opts, kw):
    """The scorer the ``--prm`` flag names, and its name for the report."""
    if args.prm == "minilm":
        from p2t.attribution.minilm import minilm_scorer
        refs = [r.get("reference") or r["prompt"] for r in rows]
        if args.policy_tokenizer:
            from transformers import AutoTokenizer
            opts["policy_tokenizer"] = AutoTokenizer.from_pretrained(args.policy_tokenizer)
        scorer = minilm_scorer(refs, **opts)
        if args.device:
            scorer.model.to(args.device)
        return scorer, "embedded MiniLM similarity reward"
    if args.prm == "lab":
        from p2t.attribution import P2TScorer
        from p2t.grpo import lab

        paths = lab.ensure_lab(log=lambda m: print(m, file=sys.stderr))
        return P2TScorer.from_pretrained(paths["prm"], kind="step_classifier", tokenizer=lab.lab_tokenizer(),
                                         device=args.device, **{**lab.LAYOUT, **opts}), "toy lab PRM"
    if args.image or any(r.get("image") for r in rows):
        from PIL import Image

        from p2t.attribution.multimodal import MultimodalP2TScorer
        paths = [r.get("image") or args.image for r in rows]
        images = {p: Image.open(p).convert("RGB") for p in set(paths) if p}
        kw["images"] = [images[p] if p else None for p in paths]
        return MultimodalP2TScorer.from_pretrained(args.prm, kind=args.kind, tokenizer=args.tokenizer,
                                                   policy_tokenizer=args.policy_tokenizer, device=args.device,
                                                   trust_remote_code=args.trust_remote_code, **opts), args.prm
    from p2t.attribution import P2TScorer
    return P2TScorer.from_pretrained(args.prm, kind=args.kind, tokenizer=args.tokenizer,
                                     policy_tokenizer=args.policy_tokenizer, device=args.device,
                                     trust_remote_code=args.trust_remote_code, **opts), args.prm
