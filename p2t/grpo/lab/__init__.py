"""The embedded toy lab: a verifiable multi-step task, a character-level tokenizer, a tiny Qwen2 policy
warm-started by SFT and a tiny step-classifier PRM, all built and trained here (no download).

The build writes what it measured to ``lab_metrics.json`` next to each checkpoint: the SFT policy's
sampled and greedy accuracy on held-out problems and what its wrong steps got wrong, the PRM's step
accuracy, wrong-step recall and step-score AUROC on fresh policy samples. The README's "GRPO and the
toy lab" section has the figures of the shipped checkpoints.
"""
from .models import LabConfig, ensure_lab  # noqa: F401
from .tokenizer import CharTokenizer  # noqa: F401
