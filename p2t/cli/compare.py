"""`p2t compare`: outcome vs process vs P2T rewards on the toy lab, several seeds, one plot + one table.

Every run uses the same lab (SFT policy, PRM), the same evaluation prompts and sampling seed, and the
same seeds; only the advantages differ:

* ``outcome``  - GRPO, A^ only;
* ``process``  - A^ + alpha * R_s on the tokens of step s;
* ``p2t``      - A^ + alpha * r_i, the paper's settings (omega 0.6, temperature 1, raw attributions);
* ``p2t-std``  - the same with attributions standardised within each step and a softmax temperature
  (``--std-temperature``), which makes the redistribution non-uniform when raw attributions are small;
* ``p2t-exact`` - P2T with the ``exact`` attributions (each token replaced by the null, the PRM re-run),
  sharpened like ``p2t-std`` (one PRM forward per token: the slowest variant);
* ``p2t-ig``   - P2T with integrated gradients (16 points), standardised like ``p2t-std``;
* ``p2t-zero`` - the paper's settings with the zero embedding as the null instead of PAD: on the shipped
  lab the first-order method and null that localise wrong tokens best (``p2t localise``: AUROC 0.83 vs
  0.74 for PAD; integrated gradients with 16 points reach 0.85 at 15x the cost);
* ``p2t-ps``   - P2T with per-step gradients (``taylor_per_step``: each step's tokens get the gradient of
  their own step's score only), standardised like ``p2t-std``;
* ``p2t-signed`` - the paper's settings plus the signed blame term ω⁻ (``--omega-neg``, default 0.6):
  ``r_i = R_s + ω·R_s·softmax(I/τ)_i − ω⁻·(1 − R_s)·softmax(−I/τ)_i``;
* ``p2t-signed-zero`` - ``p2t-signed`` with the zero null.

Each variant is a row of :data:`VARIANTS`: the :class:`p2t.P2TOptions` fields it sets (checked by
``P2TOptions``), passed to each run as the matching ``p2t train`` flags.

Runs go to ``<output-dir>/<mode>-seed<k>/`` (each a ``p2t train`` run, ``--jobs`` at a time, one CPU
thread each); results in ``<output-dir>/compare.png``, ``compare.md`` and ``compare.json``.

Reported per mode over the seeds: final sampled accuracy, AUC (mean accuracy over training) and
updates to a threshold (``--threshold``; default: the start plus 3/4 of outcome's mean gain), as
mean ± sd; Welch t-tests and bootstrap 95 % intervals of the difference of means against ``outcome``
and ``process``; and the reward-hacking track: the true step accuracy of the training samples next to
the PRM's mean step reward, averaged over the first and the last tenth of the updates.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checks import check_file

class FromFlag(str):
    """A variant's option value taken from the ``p2t compare`` flag of this name (e.g. ``--std-temperature``)."""


#: variant -> the P2TOptions fields it sets (the rest: the shared config's)
VARIANTS: Dict[str, Dict[str, Any]] = {
    "outcome": {"mode": "outcome"},
    "process": {"mode": "process"},
    "p2t": {"mode": "p2t"},
    "p2t-std": {"mode": "p2t", "standardize": True, "temperature": FromFlag("std_temperature")},
    "p2t-exact": {"mode": "p2t", "method": "exact", "standardize": True, "temperature": FromFlag("std_temperature")},
    "p2t-ig": {"mode": "p2t", "method": "integrated_gradients", "standardize": True,
               "temperature": FromFlag("std_temperature")},
    "p2t-ps": {"mode": "p2t", "method": "taylor_per_step", "standardize": True,
               "temperature": FromFlag("std_temperature")},
    "p2t-zero": {"mode": "p2t", "null": "zero"},
    "p2t-signed": {"mode": "p2t", "omega_neg": FromFlag("omega_neg")},
    "p2t-signed-zero": {"mode": "p2t", "omega_neg": FromFlag("omega_neg"), "null": "zero"},
}


def configure(parser: argparse.ArgumentParser):
    from p2t.options import NULLS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    parser.add_argument("--modes", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first-seed .. first-seed+seeds-1 (report on seeds no setting was chosen on)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="accuracy for 'updates to threshold' (default: start + 3/4 of outcome's mean gain)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--std-temperature", type=float, default=0.5,
                        help="the softmax temperature τ of the standardised variants (p2t-std, -exact, -ig, -ps)")
    parser.add_argument("--omega-neg", type=float, default=0.6,
                        help="ω⁻ of the signed variants (p2t-signed, p2t-signed-zero)")
    parser.add_argument("--config", metavar="FILE", help="a p2t train config file shared by every run")
    parser.add_argument("--prm-null", choices=NULLS, default=None,
                        help="the scorer's null embedding in every run (default: the scorer's, pad)")
    parser.add_argument("--resume", action="store_true", help="skip runs that already finished")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: summarise the runs of the seed range that finished (per mode)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after '--': extra `p2t train` flags shared by every run (e.g. -- --num-updates 50)")


def variant_options(args, variant: str) -> Dict[str, Any]:
    """The P2TOptions fields ``variant`` sets, with the values of the flags it names, as
    :class:`p2t.P2TOptions` checks and stores them (a bad value is a ``ValueError`` naming the option)."""
    from p2t.options import P2TOptions
    row = {k: getattr(args, v) if isinstance(v, FromFlag) else v for k, v in VARIANTS[variant].items()}
    opts = P2TOptions.build(**row)
    return {k: getattr(opts, k) for k in row}


def _train_flags(args, variant: str, seed: int, out: str) -> List[str]:
    from p2t.grpo.config import OPTION_FIELDS
    field_of = {opt: name for name, opt in OPTION_FIELDS.items()}   # P2TOptions field -> p2t train flag
    flags = ["--seed", str(seed), "--output-dir", out, "--no-progress", "--threads", "1"]
    if args.config:
        flags += ["--config", args.config]
    if args.prm_null:
        flags += ["--prm-null", args.prm_null]
    extra = [a for a in args.train_args if a != "--"]
    flags += extra
    for k, v in variant_options(args, variant).items():
        flag = "--" + field_of[k].replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + flag[2:])
        else:
            flags += [flag, str(v)]
    return flags


def _variant_settings(args, modes: Sequence[str]) -> str:
    """What each variant run here changes against the shared settings, e.g. "; p2t-zero: null zero"."""
    out = []
    for m in modes:
        parts = [k if v is True else f"{k} {v}" for k, v in variant_options(args, m).items() if k != "mode"]
        if parts:
            out.append(f"{m}: {', '.join(parts)}")
    return "".join("; " + o for o in out)


def _read(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _curve(records: List[dict]):
    pts = [(r["update"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Mean sampled accuracy over training: trapezoid area under the eval curve / number of updates."""
    if len(x) < 2:
        return float(y[0]) if len(y) else float("nan")
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def updates_to(x: np.ndarray, y: np.ndarray, threshold: float) -> Optional[float]:
    """First evaluated update at which the accuracy reaches ``threshold`` (None: never)."""
    hit = np.nonzero(y >= threshold)[0]
    return float(x[hit[0]]) if len(hit) else None


def welch(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Welch's t statistic and two-sided p-value of mean(a) - mean(b) (p is nan without scipy)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return float("nan"), float("nan")
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    try:
        from scipy import stats
        p = float(2 * stats.t.sf(abs(t), df))
    except ImportError:
        p = float("nan")
    return float(t), p


def bootstrap_ci(a: Sequence[float], b: Sequence[float], n: int = 10000, seed: int = 0) -> Tuple[float, float]:
    """95 % bootstrap interval of mean(a) - mean(b) (seeds resampled with replacement in each group)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:  # one seed: no spread to resample
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    d = rng.choice(a, (n, len(a))).mean(1) - rng.choice(b, (n, len(b))).mean(1)
    return float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def _window_mean(records: List[dict], key: str, first: bool) -> Optional[float]:
    ups = [r for r in records if key in r and r.get(key) is not None]
    if not ups:
        return None
    k = max(1, len(ups) // 10)
    part = ups[:k] if first else ups[-k:]
    return float(np.mean([r[key] for r in part]))


def summarise(runs: Dict[str, List[List[dict]]], threshold: Optional[float] = None) -> dict:
    out = {}
    for mode, recs in runs.items():
        curves = [_curve(r) for r in recs]
        n = min(len(c[0]) for c in curves)
        x = curves[0][0][:n]
        ys = np.stack([c[1][:n] for c in curves])
        out[mode] = {"updates": x.tolist(), "mean": ys.mean(0).tolist(), "std": ys.std(0).tolist(),
                     "per_seed": ys.tolist(), "auc": [auc(x, y) for y in ys], "final": ys[:, -1].tolist(),
                     "start": ys[:, 0].tolist()}
        track = {}
        for key in ("step_accuracy", "step_reward"):
            for first in (True, False):
                vals = [_window_mean(r, key, first) for r in recs]
                if all(v is not None for v in vals):
                    track[f"{key}_{'first' if first else 'last'}"] = vals
        out[mode]["track"] = track
    if "outcome" in out:
        target = float(np.mean(out["outcome"]["final"]))
        for mode, s in out.items():
            hit = [u for u, m in zip(s["updates"], s["mean"]) if m >= target]
            s["updates_to_outcome_final"] = hit[0] if hit else None
            s["outcome_final_target"] = target
        if threshold is None:
            start = float(np.mean(out["outcome"]["start"]))
            threshold = start + 0.75 * (target - start)
    if threshold is not None:
        for mode, s in out.items():
            x = np.array(s["updates"])
            s["threshold"] = threshold
            s["updates_to_threshold"] = [updates_to(x, np.array(y), threshold) for y in s["per_seed"]]
    for ref in ("outcome", "process"):
        if ref not in out:
            continue
        for mode, s in out.items():
            if mode == ref or (ref == "process" and mode == "outcome"):  # process - outcome is listed already
                continue
            tests = {}
            for metric in ("final", "auc"):
                t, p = welch(s[metric], out[ref][metric])
                lo, hi = bootstrap_ci(s[metric], out[ref][metric])
                tests[metric] = {"diff": float(np.mean(s[metric]) - np.mean(out[ref][metric])), "t": t, "p": p,
                                 "ci95": [lo, hi]}
            s.setdefault("vs", {})[ref] = tests
    return out


def _reach(vals: List[Optional[float]], cap: float) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return "not reached"
    filled = np.array([cap if v is None else v for v in vals])
    miss = len(vals) - len(got)
    note = f" ({miss} not reached, counted as {cap:.0f})" if miss else ""
    return f"{filled.mean():.0f} ± {filled.std():.0f}" + note


def table(summary: dict, settings: str) -> str:
    lines = ["| mode | start acc | final acc (mean ± sd) | AUC (mean ± sd) | updates to outcome's final acc |"
             " updates to threshold | step acc first → last (true) | PRM step reward first → last |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        f, a = np.array(s["final"]), np.array(s["auc"])
        reach = s.get("updates_to_outcome_final")
        thr = _reach(s["updates_to_threshold"], s["updates"][-1]) if "updates_to_threshold" in s else ""
        tr = s.get("track", {})
        sa = (f"{np.mean(tr['step_accuracy_first']):.3f} → {np.mean(tr['step_accuracy_last']):.3f}"
              if "step_accuracy_first" in tr else "")
        sr = (f"{np.mean(tr['step_reward_first']):.3f} → {np.mean(tr['step_reward_last']):.3f}"
              if "step_reward_first" in tr else "")
        lines.append(f"| {mode} | {np.mean(s['start']):.3f} | {f.mean():.3f} ± {f.std():.3f} | "
                     f"{a.mean():.3f} ± {a.std():.3f} | {'not reached' if reach is None else int(reach)} | "
                     f"{thr} | {sa} | {sr} |")
    tests = [(mode, ref, t) for mode, s in summary.items() for ref, t in s.get("vs", {}).items()]
    if tests:
        lines += ["",
                  "| comparison | Δ final acc [95 % bootstrap CI] | Welch p | Δ AUC [95 % bootstrap CI] | Welch p |",
                  "|---|---|---|---|---|"]
        def cell(d):
            ci = "n/a" if np.isnan(d["ci95"][0]) else f"{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}"
            p = "n/a" if np.isnan(d["p"]) else f"{d['p']:.3f}"
            return f"{d['diff']:+.3f} [{ci}] | {p}"
        for mode, ref, t in tests:
            lines.append(f"| {mode} − {ref} | {cell(t['final'])} | {cell(t['auc'])} |")
    thr = next((s["threshold"] for s in summary.values() if "threshold" in s), None)
    note = f"Threshold {thr:.3f}. " if thr is not None else ""
    return "\n".join(lines) + "\n\n" + note + settings + "\n"


def plot_compare(runs: Dict[str, List[List[dict]]], path: str, title: Optional[str] = None):
    """Three panels per mode (mean over seeds, shaded min-max): held-out sampled accuracy, the true step
    accuracy of the training samples and the PRM's mean step reward on them (reward hacking shows as the
    two diverging)."""
    from p2t.grpo.metrics import plot_panels
    plot_panels(runs, path, (("eval_accuracy", "sampled accuracy, held-out prompts", False),
                             ("step_accuracy", "true step accuracy (training samples)", True),
                             ("step_reward", "PRM mean step reward (training samples)", True)), title)


def run(args) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in VARIANTS]
    if bad:
        print(f"p2t compare: unknown mode(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.jobs < 1:
        print("p2t compare: --seeds and --jobs must be >= 1", file=sys.stderr)
        return 2
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    check_file("--config", args.config)
    # every run's settings checked before anything starts: the variants' options, the paths they name
    from p2t.cli.train import check_paths
    from p2t.cli.train import configure as train_configure
    from p2t.grpo.config import from_args
    from p2t.grpo.lab import ensure_lab
    from p2t.grpo.setup import uses_lab
    probe = argparse.ArgumentParser()
    train_configure(probe)
    try:
        configs = {m: from_args(probe.parse_args(_train_flags(args, m, seeds[0], args.output_dir))) for m in modes}
    except (ValueError, TypeError) as e:
        print(f"p2t compare: {e}", file=sys.stderr)
        return 2
    base = configs[modes[0]]
    check_paths(base)
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    # build (or find) the lab once, before the runs start in parallel
    if uses_lab(base):
        ensure_lab(base.lab, base.lab_cache, log=lambda s: print(s, file=sys.stderr, flush=True),
                   packaged=base.lab_packaged)
    t_lab = time.time() - t0
    # the slowest runs first, so that the last ones to finish are short
    cost = {"p2t-exact": 0, "p2t-ig": 1, "p2t-ps": 2, "p2t": 2, "p2t-std": 2, "process": 3, "outcome": 4}
    jobs = sorted([(m, s) for s in seeds for m in modes], key=lambda j: (cost.get(j[0], 2), j[1]))
    if args.report_only:
        jobs = []
    pending, running, failed = list(jobs), [], []
    walls: Dict[str, List[float]] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while pending or running:
        while pending and len(running) < args.jobs:
            m, s = pending.pop(0)
            out = os.path.join(args.output_dir, f"{m}-seed{s}")
            if args.resume and os.path.exists(os.path.join(out, "summary.json")):
                continue
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "train.log"), "w")
            cmd = [sys.executable, "-m", "p2t", "train"] + _train_flags(args, m, s, out)
            running.append((m, s, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                            time.time()))
        time.sleep(1.0)
        for item in list(running):
            m, s, proc, log, started = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                if proc.returncode:
                    failed.append((m, s))
                walls.setdefault(m, []).append(time.time() - started)
                print(f"[{time.time() - t0:6.0f}s] {m} seed {s}: {status} in {time.time() - started:.0f}s",
                      file=sys.stderr, flush=True)
    if failed:
        print(f"p2t compare: {len(failed)} run(s) failed; see their train.log", file=sys.stderr)
        return 1
    done = {m: [s for s in seeds if os.path.exists(os.path.join(args.output_dir, f"{m}-seed{s}", "summary.json"))]
            for m in modes}
    if args.report_only:
        missing = [m for m in modes if not done[m]]
        if missing:
            print(f"p2t compare: no finished run of {', '.join(missing)} in {args.output_dir}", file=sys.stderr)
            return 1
        for m in modes:
            walls[m] = [json.load(open(os.path.join(args.output_dir, f"{m}-seed{s}", "summary.json")))["total_s"]
                        for s in done[m]]
    else:
        done = {m: seeds for m in modes}
    runs = {m: [_read(os.path.join(args.output_dir, f"{m}-seed{s}", "metrics.jsonl")) for s in done[m]]
            for m in modes}
    summary = summarise(runs, args.threshold)
    cfg = json.load(open(os.path.join(args.output_dir, f"{modes[0]}-seed{done[modes[0]][0]}", "config.json")))
    wall = ", ".join(f"{m} {np.mean(w):.0f}s" for m, w in walls.items())
    counts = ", ".join(f"{m} {len(done[m])}" for m in modes)
    settings = (f"Settings: seeds {seeds[0]}..{seeds[-1]} (runs per mode: {counts}); {cfg['num_updates']} updates of "
                f"{cfg['prompts_per_update']} prompts x {cfg['group_size']} samples; lr {cfg['learning_rate']}; loss "
                f"{cfg['loss_type']}; alpha {cfg['alpha']}; omega {cfg['omega']}; null {cfg.get('prm_null') or 'pad'}"
                f"{_variant_settings(args, modes)}; sampled accuracy (temperature "
                f"{cfg['eval_temperature']}) on {cfg['eval_prompts']} held-out prompts x "
                f"{cfg['eval_samples_per_prompt']} samples every {cfg['eval_every']} updates; AUC = mean accuracy "
                f"over training (trapezoid); sd over seeds (population); step accuracy / PRM step reward: mean "
                f"over the first and last tenth of the updates. Wall time {time.time() - t0:.0f}s with {args.jobs} "
                f"runs at a time (lab warm-up {t_lab:.0f}s; mean per run: {wall or 'resumed'}).")
    if args.report_only:
        settings = settings.replace(f"Wall time {time.time() - t0:.0f}s with {args.jobs} runs at a time", "Summarised")
    md = table(summary, settings)
    with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.output_dir, "compare.json"), "w") as f:
        json.dump({"summary": summary, "settings": settings, "config": cfg, "seeds": done}, f, indent=1)
    plot_compare(runs, os.path.join(args.output_dir, "compare.png"),
                 title=f"toy lab: {counts} seeds, mean and min-max")
    print(md)
    return 0
