"""The embedded toy lab: a verifiable multi-step task, a character-level tokenizer, a tiny Qwen2 policy
warm-started by SFT and a tiny step-classifier PRM, all built and trained here (no download).

Measured with the default :class:`~p2t.grpo.lab.models.LabConfig` on a 2-core CPU:

* SFT policy (800 steps of 128 noisy solutions): greedy accuracy 0.90, sampled (temperature 1)
  accuracy 0.28 on 400 held-out samples, so sampled accuracy is the metric GRPO can move;
* PRM (600 steps, per-token auxiliary labels, read at the step separators): step accuracy 0.72 and
  wrong-step recall 0.48 on the SFT policy's samples (34% of whose steps are wrong);
* its Taylor attributions on policy samples: mean |I| about 0.12, and the paper's within-step softmax
  of them has normalised entropy about 0.985 (nearly uniform), which ``standardize`` and
  ``attr_temperature`` change.
"""
from .models import LabConfig, ensure_lab  # noqa: F401
from .tokenizer import CharTokenizer  # noqa: F401
