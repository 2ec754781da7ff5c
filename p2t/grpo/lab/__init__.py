"""The embedded toy lab: a verifiable multi-step task, a character-level tokenizer, a tiny Qwen2 policy
warm-started by SFT and a tiny step-classifier PRM, all built here (no download).

The build writes what it measured to ``lab_metrics.json`` next to each checkpoint: the SFT policy's
sampled and greedy accuracy on held-out problems and what its wrong steps got wrong, the PRM's step
accuracy, wrong-step recall and step-score AUROC on fresh policy samples.

Modules, one job each: :mod:`.task` (problems, solutions, step labels), :mod:`.tokenizer`,
:mod:`.config` (:class:`LabConfig`, the cache key), :mod:`.layout` (the PRM's input, :data:`LAYOUT` for
:class:`p2t.P2TScorer`), :mod:`.sft` (the policy), :mod:`.prm` (the PRM), :mod:`.metrics` (what the
build measures), :mod:`.cache` (shipped and cached checkpoints, :func:`ensure_lab`) and
:mod:`.localisation` (do attributions point at the wrong tokens?).
"""
from . import task
from .cache import checkpoint_settings, ensure_lab, packaged_lab
from .config import LabConfig, lab_tokenizer
from .layout import LAYOUT, prm_text
from .tokenizer import CharTokenizer

__all__ = ["task", "LabConfig", "ensure_lab", "packaged_lab", "checkpoint_settings", "lab_tokenizer", "LAYOUT", "prm_text",
           "CharTokenizer"]
