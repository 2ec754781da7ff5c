"""`p2t attribute`: per-token PRM attributions as a terminal heatmap and a self-contained HTML file.

Input: a JSONL file of ``{"prompt": ..., "response": ...}`` objects (an optional ``"reference"``
solution is used by the embedded MiniLM reward); by default the sample shipped with the package.
PRM: a path or hub id (``--prm``, with ``--kind``); ``--prm lab`` (the default): the toy lab's step
classifier (shipped with the package, read with the lab's layout: ``BOS prompt line\n line\n ...``);
``--prm minilm``: the embedded MiniLM similarity reward (real pretrained weights; reads any text).
``--image``: an image file read with every prompt (records may name their own ``"image"``) by a
vision-language PRM (:class:`p2t.attribution.multimodal.MultimodalP2TScorer`).
"""
from __future__ import annotations

import json
import os
import sys

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SAMPLE = os.path.join(DATA, "attribute_sample.jsonl")
LAB_SAMPLE = os.path.join(DATA, "attribute_lab_sample.jsonl")
LAB_LAYOUT = dict(template="{prompt}{response}", step_separator="\n", step_split="\n")


def _unescape(text):
    return None if text is None else text.encode("utf-8").decode("unicode_escape")


def configure(parser):
    parser.add_argument("input", nargs="?", default=None,
                        help="JSONL of {prompt, response[, reference]} objects (default: the shipped sample for "
                             "the PRM)")
    parser.add_argument("--prm", default="lab",
                        help="PRM path or hub id; 'lab' (default): the toy lab's PRM; 'minilm': the embedded MiniLM "
                             "similarity reward")
    parser.add_argument("--kind", default="step_classifier", choices=["step_classifier", "value_head", "lm_judge"])
    parser.add_argument("--tokenizer", default=None, help="PRM tokenizer path when it is not next to the model")
    parser.add_argument("--policy-tokenizer", default=None, help="policy tokenizer path (default: the PRM's)")
    parser.add_argument("--method", default="taylor",
                        choices=["taylor", "taylor_per_step", "integrated_gradients", "exact"])
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--objective", default="logit", choices=["logit", "prob"])
    parser.add_argument("--null", default="pad", help="null embedding: pad, eos, vocab_mean, zero or a token id")
    parser.add_argument("--step-split", default=None, help=r"text between steps, escapes allowed (e.g. '\n')")
    parser.add_argument("--separator", default=None, help="step separator inserted after each step")
    parser.add_argument("--template", default=None, help="'chat' or a string with {prompt} and {response}")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--html", default="attribution.html", help="HTML output file (default: attribution.html)")
    parser.add_argument("--no-color", action="store_true", help="scores in brackets instead of ANSI colours")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--image", default=None,
                        help="image file read with every prompt by a vision-language PRM (a record's own \"image\" "
                             "path overrides it)")


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


def run(args) -> int:
    try:
        rows = _read(args.input or (LAB_SAMPLE if args.prm == "lab" else SAMPLE), args.limit)
        null = int(args.null) if str(args.null).lstrip("-").isdigit() else args.null
        opts = dict(null=null, objective=args.objective, ig_steps=args.ig_steps)
        for key, value in (("step_split", _unescape(args.step_split)), ("step_separator", _unescape(args.separator)),
                           ("template", _unescape(args.template))):
            if value is not None:
                opts[key] = value
        prompts = [r["prompt"] for r in rows]
        kw = {}
        responses = [r["response"] for r in rows]
        if args.image and args.prm in ("lab", "minilm"):
            raise ValueError(f"--image needs a vision-language PRM (--prm PATH); --prm {args.prm} reads text only")
        if args.prm == "minilm":
            from p2t.attribution.minilm import minilm_scorer
            refs = [r.get("reference") or r["prompt"] for r in rows]
            if args.policy_tokenizer:
                from transformers import AutoTokenizer
                opts["policy_tokenizer"] = AutoTokenizer.from_pretrained(args.policy_tokenizer)
            scorer = minilm_scorer(refs, **opts)
            if args.device:
                scorer.model.to(args.device)
            name = "embedded MiniLM similarity reward"
        elif args.prm == "lab":
            from p2t.attribution import P2TScorer
            from p2t.grpo.lab import models as lab

            paths = lab.ensure_lab(log=lambda m: print(m, file=sys.stderr))
            scorer = P2TScorer.from_pretrained(paths["prm"], kind="step_classifier", tokenizer=lab.lab_tokenizer(),
                                               device=args.device, **{**LAB_LAYOUT, **opts})
            name = "toy lab PRM"
        elif args.image or any(r.get("image") for r in rows):
            from PIL import Image

            from p2t.attribution.multimodal import MultimodalP2TScorer
            paths = [r.get("image") or args.image for r in rows]
            images = {p: Image.open(p).convert("RGB") for p in set(paths) if p}
            kw["images"] = [images[p] if p else None for p in paths]
            scorer = MultimodalP2TScorer.from_pretrained(args.prm, kind=args.kind, tokenizer=args.tokenizer,
                                                         policy_tokenizer=args.policy_tokenizer, device=args.device,
                                                         trust_remote_code=args.trust_remote_code, **opts)
            name = args.prm
        else:
            from p2t.attribution import P2TScorer
            scorer = P2TScorer.from_pretrained(args.prm, kind=args.kind, tokenizer=args.tokenizer,
                                               policy_tokenizer=args.policy_tokenizer, device=args.device,
                                               trust_remote_code=args.trust_remote_code, **opts)
            name = args.prm
        batch = scorer.score(prompts, responses, method=args.method, **kw)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"p2t attribute: error: {e}", file=sys.stderr)
        return 2
    from p2t.attribution.render import html_report, terminal_heatmap

    color = not args.no_color and "NO_COLOR" not in os.environ
    print(f"PRM: {name}; method: {args.method}; {len(rows)} responses, {sum(batch.steps_per_response)} steps\n")
    print(terminal_heatmap(batch, prompts, color=color))
    with open(args.html, "w", encoding="utf-8") as f:
        f.write(html_report(batch, prompts, title=f"p2t attribution: {name}"))
    print(f"wrote {args.html}")
    return 0
