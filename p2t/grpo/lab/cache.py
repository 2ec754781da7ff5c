"""Where the lab's checkpoints live: the ones shipped with p2t (``p2t/data/lab``), else a cache built on
first use. Both are keyed by :meth:`LabConfig.key`: ``<root>/<key of the SFT settings>/policy`` and
``.../prm-<key of all settings>``, each with ``lab_metrics.json`` (what the build measured) and
``lab.json`` (the settings it was built from)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, fields
from typing import Callable, Optional

import torch

from .config import LabConfig, default_cache_dir, lab_tokenizer
from .metrics import kinds_text, policy_report, prm_report
from .prm import build_prm
from .sft import log_to, train_sft
from .tokenizer import CharTokenizer

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "data", "lab")
SETTINGS_FILE = "lab.json"


def save_checkpoint(d: str, model, tok: CharTokenizer, metrics: dict, lab: Optional[LabConfig] = None):
    """A lab checkpoint: the model, its tokenizer, the build's measurements (``lab_metrics.json``) and the
    settings it was built from (``lab.json``)."""
    model.save_pretrained(d)
    tok.save_pretrained(d)
    with open(os.path.join(d, "lab_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    if lab is not None:
        with open(os.path.join(d, SETTINGS_FILE), "w") as f:
            json.dump(asdict(lab), f, indent=1)


def save_atomic(save: Callable[[str], None], path: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        save(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def lab_paths(root: str, lab: LabConfig) -> dict:
    base = os.path.join(root, lab.key("sft"))
    return {"policy": os.path.join(base, "policy"), "prm": os.path.join(base, "prm-" + lab.key()), "root": base}


def checkpoint_settings(path: str) -> LabConfig:
    """The lab settings a checkpoint directory was built from (its ``lab.json``; the defaults where the
    file is missing, as in checkpoints written before it existed)."""
    try:
        with open(os.path.join(path, SETTINGS_FILE), encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        return LabConfig()
    known = {f.name for f in fields(LabConfig)}
    return LabConfig(**{k: v for k, v in d.items() if k in known})


def packaged_lab(lab: Optional[LabConfig] = None) -> Optional[dict]:
    """Paths of the lab checkpoints shipped with p2t for these settings, or None."""
    paths = lab_paths(PACKAGED_DIR, lab or LabConfig())
    ok = all(os.path.exists(os.path.join(paths[k], "config.json")) for k in ("policy", "prm"))
    return paths if ok else None


def build_policy(lab: LabConfig, path: str, log=None):
    """Train the SFT policy, measure it and save it to ``path``."""
    tok = lab_tokenizer()
    log_to(log, f"lab: training the SFT policy -> {path}")
    t0 = time.time()
    policy = train_sft(tok, lab, log)
    t_sft = time.time() - t0
    report = policy_report(policy, tok, lab)
    log_to(log, f"lab: SFT done in {t_sft:.0f}s; on {report['samples']} held-out problems: sampled accuracy "
                f"{report['sampled_accuracy']:.3f}, greedy {report['greedy_accuracy']:.3f}, wrong steps "
                f"{report['wrong_step_share']:.3f} ({kinds_text(report['wrong_step_kinds'])})")
    save_atomic(lambda d: save_checkpoint(d, policy, tok, report, lab), path)


def build_lab_prm(lab: LabConfig, policy_path: str, path: str, log=None):
    """Build (or train) the PRM on the saved SFT policy, measure it and save it to ``path``."""
    from transformers import Qwen2ForCausalLM
    tok = lab_tokenizer()
    policy = Qwen2ForCausalLM.from_pretrained(policy_path)
    how = "building the verifier PRM on the SFT policy" if lab.prm_kind == "verifier" else "training the PRM"
    log_to(log, f"lab: {how} -> {path}")
    t0 = time.time()
    prm, _ = build_prm(policy, tok, lab, log)
    metrics = prm_report(prm, policy, tok, lab)
    log_to(log, f"lab: PRM done in {time.time() - t0:.0f}s; on {metrics['samples']} fresh policy samples: step "
                f"accuracy {metrics['step_accuracy']:.3f}, wrong-step recall {metrics['wrong_step_recall']:.3f}, "
                f"right-step recall {metrics['right_step_recall']:.3f}, AUROC {metrics['step_auroc']:.3f}")
    save_atomic(lambda d: save_checkpoint(d, prm, tok, metrics, lab), path)


def ensure_lab(lab: Optional[LabConfig] = None, cache_dir: Optional[str] = None, log=None,
               packaged: bool = True) -> dict:
    """Paths of the lab's SFT policy and PRM.

    With ``packaged=True`` the checkpoints shipped with p2t are used when they were built from the same
    settings; otherwise they are built (single-threaded, seeded: the same settings and torch build give
    the same weights, which is how the shipped ones were made) and cached in ``cache_dir``.
    """
    lab = lab or LabConfig()
    if packaged:
        found = packaged_lab(lab)
        if found is not None:
            log_to(log, f"lab: using the packaged checkpoints {found['root']}")
            return found
    paths = lab_paths(cache_dir or default_cache_dir(), lab)
    todo = [part for part in ("policy", "prm") if not os.path.exists(os.path.join(paths[part], "config.json"))]
    if not todo:
        return paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions: a rebuild gives the same weights
    try:
        if "policy" in todo:
            build_policy(lab, paths["policy"], log)
        if "prm" in todo:
            build_lab_prm(lab, paths["policy"], paths["prm"], log)
    finally:
        torch.set_num_threads(threads)
    return paths
