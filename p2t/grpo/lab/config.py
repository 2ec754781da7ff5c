"""The lab's settings (:class:`LabConfig`, whose hash keys the checkpoint cache), its tokenizer and the
policy's transformers config."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from . import task
from .tokenizer import CharTokenizer

LAB_VERSION = 2


@dataclass
class LabConfig:
    """Settings of the lab's warm-up (the cache key is a hash of these).

    Learning rates warm up linearly for 50 (SFT) / 20 (PRM) steps, then follow a cosine down to
    ``*_lr_min``. The PRM trains on ``prm_samples`` of the SFT policy's own responses mixed with fresh
    synthetic noisy solutions (``prm_synthetic`` of each batch, step results wrong with probability
    ``prm_synthetic_error_rate``), so it sees many more wrong steps than the policy makes. The PRM is
    the SFT policy's layers plus ``prm_extra_layers`` fresh ones on top: whether a written digit is wrong
    is "does it differ from what the policy's last layer predicted at the token before", which a fresh
    layer can read by attending to the previous token. ``prm_train_base`` also trains the policy's layers.

    ``prm_kind="verifier"`` (the default) builds the PRM instead of training it: the policy's layers plus
    layers on top that flag every written token some other token beat by more than ``prm_margin`` logits
    in the policy's own prediction, and a head calibrated on ``prm_samples`` policy samples (see
    :func:`p2t.grpo.lab.prm.verifier_prm`); ``prm_kind="trained"`` trains the classifier described above.

    ``ops_per_step`` is the step length: the additions written on one line (``1``: ``17+25=42``; ``2``:
    ``17+25=42 42+33=75``). The SFT data, the policy and the PRM are built for it.
    """
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    sft_steps: int = 1400
    sft_batch_size: int = 128
    sft_lr: float = 3e-3
    sft_lr_min: float = 5e-5
    sft_error_rate: float = 0.25
    prm_steps: int = 1000
    prm_batch_size: int = 128
    prm_lr: float = 1e-3
    prm_lr_min: float = 5e-5
    prm_samples: int = 1024
    prm_sample_temperature: float = 1.0
    prm_synthetic: float = 0.5
    prm_synthetic_error_rate: float = 0.4
    prm_extra_layers: int = 2
    prm_train_base: bool = False
    prm_kind: str = "verifier"
    prm_margin: float = 0.0
    report_samples: int = 400
    seed: int = 1234
    ops_per_step: int = 1

    def __post_init__(self):
        task.check_ops_per_step(self.ops_per_step)
        if self.prm_kind not in PRM_KINDS:
            raise ValueError(f"prm_kind must be one of {', '.join(PRM_KINDS)}, got {self.prm_kind!r}")

    def key(self, part: str = "all") -> str:
        """Cache key: of the SFT settings (``part="sft"``) or of all settings. ``ops_per_step=1`` is left
        out of the hash, so the one-addition lab keeps the key it had before the setting existed."""
        d = asdict(self)
        if d["ops_per_step"] == 1:
            del d["ops_per_step"]
        if part == "sft":
            d = {k: v for k, v in d.items() if not k.startswith("prm_")}
        blob = json.dumps({"v": LAB_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRM_KINDS = ("verifier", "trained")


def default_cache_dir() -> str:
    return os.environ.get("P2T_LAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "p2t", "lab"))


def lab_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def policy_config(tok: CharTokenizer, lab: LabConfig, extra_layers: int = 0):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=len(tok), hidden_size=lab.hidden_size, num_hidden_layers=lab.num_layers + extra_layers,
                       num_attention_heads=lab.num_heads, num_key_value_heads=lab.num_heads,
                       intermediate_size=lab.intermediate_size, max_position_embeddings=96,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, use_cache=True)
