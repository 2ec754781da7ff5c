"""`p2t compare`: outcome vs process vs P2T rewards on the toy lab, several seeds, one plot + one table.

Every run uses the same lab (SFT policy, PRM), the same evaluation prompts and sampling seed, and the
same seeds; only the advantages differ:

* ``outcome``  - GRPO, A^ only;
* ``process``  - A^ + alpha * R_s on the tokens of step s;
* ``p2t``      - A^ + alpha * r_i, the paper's settings (omega 0.6, temperature 1, raw attributions);
* ``p2t-std``  - the same with attributions standardised within each step and a softmax temperature
  (``--std-temperature``), which makes the redistribution non-uniform when raw attributions are small.

Runs go to ``<output-dir>/<mode>-seed<k>/`` (each a ``p2t train`` run, ``--jobs`` at a time, one CPU
thread each); results in ``<output-dir>/compare.png``, ``compare.md`` and ``compare.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

VARIANTS = {
    "outcome": {"mode": "outcome"},
    "process": {"mode": "process"},
    "p2t": {"mode": "p2t"},
    "p2t-std": {"mode": "p2t", "standardize": True},
}


def configure(parser: argparse.ArgumentParser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    parser.add_argument("--modes", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--std-temperature", type=float, default=0.5, help="attr_temperature of p2t-std")
    parser.add_argument("--config", metavar="FILE", help="a p2t train config file shared by every run")
    parser.add_argument("--resume", action="store_true", help="skip runs that already finished")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after '--': extra `p2t train` flags shared by every run (e.g. -- --num-updates 50)")


def _train_flags(args, variant: str, seed: int, out: str) -> List[str]:
    flags = ["--seed", str(seed), "--output-dir", out, "--no-progress", "--threads", "1"]
    if args.config:
        flags += ["--config", args.config]
    extra = [a for a in args.train_args if a != "--"]
    flags += extra
    for k, v in VARIANTS[variant].items():
        if isinstance(v, bool):
            flags.append(("--" if v else "--no-") + k.replace("_", "-"))
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    if variant == "p2t-std":
        flags += ["--attr-temperature", str(args.std_temperature)]
    return flags


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


def summarise(runs: Dict[str, List[List[dict]]]) -> dict:
    out = {}
    for mode, recs in runs.items():
        curves = [_curve(r) for r in recs]
        n = min(len(c[0]) for c in curves)
        x = curves[0][0][:n]
        ys = np.stack([c[1][:n] for c in curves])
        out[mode] = {"updates": x.tolist(), "mean": ys.mean(0).tolist(), "std": ys.std(0).tolist(),
                     "per_seed": ys.tolist(), "auc": [auc(x, y) for y in ys], "final": ys[:, -1].tolist(),
                     "start": ys[:, 0].tolist()}
    if "outcome" in out:
        target = float(np.mean(out["outcome"]["final"]))
        for mode, s in out.items():
            hit = [u for u, m in zip(s["updates"], s["mean"]) if m >= target]
            s["updates_to_outcome_final"] = hit[0] if hit else None
            s["outcome_final_target"] = target
    return out


def table(summary: dict, settings: str) -> str:
    lines = ["| mode | start acc | final acc (mean ± sd) | AUC (mean ± sd) | updates to outcome's final acc |",
             "|---|---|---|---|---|"]
    for mode, s in summary.items():
        f, a = np.array(s["final"]), np.array(s["auc"])
        reach = s.get("updates_to_outcome_final")
        lines.append(f"| {mode} | {np.mean(s['start']):.3f} | {f.mean():.3f} ± {f.std():.3f} | "
                     f"{a.mean():.3f} ± {a.std():.3f} | {'not reached' if reach is None else int(reach)} |")
    return "\n".join(lines) + "\n\n" + settings + "\n"


def run(args) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in VARIANTS]
    if bad:
        print(f"p2t compare: unknown mode(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.jobs < 1:
        print("p2t compare: --seeds and --jobs must be >= 1", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    # build (or find) the lab once, before the runs start in parallel
    from p2t.cli.train import configure as train_configure
    from p2t.grpo.config import from_args
    from p2t.grpo.lab.models import ensure_lab
    probe = argparse.ArgumentParser()
    train_configure(probe)
    base = from_args(probe.parse_args(_train_flags(args, modes[0], 0, args.output_dir)))
    if base.uses_lab:
        ensure_lab(base.lab, base.lab_cache, log=lambda s: print(s, file=sys.stderr, flush=True),
                   packaged=base.lab_packaged)
    t_lab = time.time() - t0
    jobs = [(m, s) for s in range(args.seeds) for m in modes]
    pending, running, failed = list(jobs), [], []
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
                print(f"[{time.time() - t0:6.0f}s] {m} seed {s}: {status} in {time.time() - started:.0f}s",
                      file=sys.stderr, flush=True)
    if failed:
        print(f"p2t compare: {len(failed)} run(s) failed; see their train.log", file=sys.stderr)
        return 1
    runs = {m: [_read(os.path.join(args.output_dir, f"{m}-seed{s}", "metrics.jsonl")) for s in range(args.seeds)]
            for m in modes}
    summary = summarise(runs)
    cfg = json.load(open(os.path.join(args.output_dir, f"{modes[0]}-seed0", "config.json")))
    settings = (f"Settings: {args.seeds} seeds; {cfg['num_updates']} updates of {cfg['prompts_per_update']} prompts x "
                f"{cfg['group_size']} samples; lr {cfg['learning_rate']}; loss {cfg['loss_type']}; alpha {cfg['alpha']}; "
                f"omega {cfg['omega']}; p2t-std: standardize, attr_temperature {args.std_temperature}; sampled "
                f"accuracy (temperature {cfg['eval_temperature']}) on {cfg['eval_prompts']} held-out prompts x "
                f"{cfg['eval_samples_per_prompt']} samples every {cfg['eval_every']} updates; AUC = mean accuracy "
                f"over training (trapezoid). Wall time {time.time() - t0:.0f}s (lab warm-up {t_lab:.0f}s).")
    md = table(summary, settings)
    with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.output_dir, "compare.json"), "w") as f:
        json.dump({"summary": summary, "settings": settings, "config": cfg}, f, indent=1)
    from p2t.grpo.metrics import plot_curves
    plot_curves(runs, os.path.join(args.output_dir, "compare.png"),
                title=f"toy lab: {args.seeds} seeds, mean and min-max")
    print(md)
    return 0
