"""The lab's tiny policy and PRM: transformers models built from configs, trained here.

* Policy: a small ``Qwen2ForCausalLM`` warm-started by SFT on worked solutions whose step results are
  wrong ``sft_error_rate`` of the time, so it samples a mix of right and wrong steps.
* PRM: a ``Qwen2ForTokenClassification`` (2 labels, the ``step_classifier`` kind) started from the SFT
  policy's weights with a new head. Labels only at step separators are too sparse for a tiny model to
  learn from, so every response token also gets an auxiliary label "this line still matches a correct
  line so far"; step scores are read at the separators. Trained on the SFT policy's own samples.

Both are saved with ``save_pretrained`` (plus the tokenizer) and cached by a hash of their settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import task
from .tokenizer import CharTokenizer

LAB_VERSION = 1


@dataclass
class LabConfig:
    """Settings of the lab's warm-up (the cache key is a hash of these)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    sft_steps: int = 800
    sft_batch_size: int = 128
    sft_lr: float = 3e-3
    sft_error_rate: float = 0.25
    prm_steps: int = 600
    prm_batch_size: int = 128
    prm_lr: float = 2e-3
    prm_samples: int = 4096
    prm_sample_temperature: float = 1.0
    seed: int = 1234

    def key(self, part: str = "all") -> str:
        """Cache key: of the SFT settings (``part="sft"``) or of all settings."""
        d = asdict(self)
        if part == "sft":
            d = {k: v for k, v in d.items() if not k.startswith("prm_")}
        blob = json.dumps({"v": LAB_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("P2T_LAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "p2t", "lab"))


def lab_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def policy_config(tok: CharTokenizer, lab: LabConfig):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=len(tok), hidden_size=lab.hidden_size, num_hidden_layers=lab.num_layers,
                       num_attention_heads=lab.num_heads, num_key_value_heads=lab.num_heads,
                       intermediate_size=lab.intermediate_size, max_position_embeddings=96,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, use_cache=True)


def prm_text(prompt: str, response: str) -> str:
    """The PRM's view of a response: prompt, steps joined by the separator, one trailing separator."""
    steps = [s for s in response.split(task.STEP_SEPARATOR)]
    return prompt + task.STEP_SEPARATOR.join(steps) + task.STEP_SEPARATOR


def _ids(tok: CharTokenizer, text: str) -> List[int]:
    return tok.convert_tokens_to_ids(list(text))


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            if left:
                out[i, n - len(r):] = torch.tensor(r)
            else:
                out[i, :len(r)] = torch.tensor(r)
    return out


def _log(msg: str, log: Optional[Callable[[str], None]]):
    if log is not None:
        log(msg)


def train_sft(tok: CharTokenizer, lab: LabConfig, log=None):
    """SFT warm start on noisy worked solutions (loss on response tokens only)."""
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(lab.seed)
    model = Qwen2ForCausalLM(policy_config(tok, lab))
    opt = torch.optim.AdamW(model.parameters(), lr=lab.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / lab.sft_steps))
    rng = random.Random(lab.seed)
    model.train()
    t0 = time.time()
    for step in range(lab.sft_steps):
        rows, labels = [], []
        for _ in range(lab.sft_batch_size):
            p = task.sample_problem(rng)
            prompt = [tok.bos_token_id] + _ids(tok, p.prompt)
            resp = _ids(tok, task.solution(p, rng, lab.sft_error_rate)) + [tok.eos_token_id]
            rows.append(prompt + resp)
            labels.append([-100] * len(prompt) + resp)
        ids = _pad(rows, tok.pad_token_id)
        lab_t = _pad(labels, -100)
        out = model(input_ids=ids, attention_mask=(lab_t != -100) | (ids != tok.pad_token_id), labels=lab_t)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == lab.sft_steps - 1:
            _log(f"sft step {step + 1}/{lab.sft_steps} loss {out.loss.item():.4f} ({time.time() - t0:.0f}s)", log)
    model.eval()
    return model


@torch.no_grad()
def sample(model, tok: CharTokenizer, prompts: Sequence[str], *, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 40, batch_size: int = 512) -> List[List[int]]:
    """Sampled response token ids (EOS and padding stripped) for each prompt, through HF ``generate``."""
    out: List[List[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        enc = tok(list(chunk), return_tensors="pt", padding=True)
        gen = model.generate(**enc, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            ids = []
            for t in row:
                if t in (tok.eos_token_id, tok.pad_token_id):
                    break
                ids.append(t)
            out.append(ids)
    return out


def train_prm(policy, tok: CharTokenizer, lab: LabConfig, log=None):
    """A step-classifier PRM from the SFT policy's weights, trained with per-token auxiliary labels."""
    from transformers import Qwen2ForTokenClassification
    torch.manual_seed(lab.seed + 1)
    rng = random.Random(lab.seed + 1)
    probs = [task.sample_problem(rng) for _ in range(lab.prm_samples)]
    t0 = time.time()
    resp_ids = sample(policy, tok, [p.prompt for p in probs], temperature=lab.prm_sample_temperature)
    _log(f"prm: sampled {len(probs)} policy responses ({time.time() - t0:.0f}s)", log)
    data = []
    for p, r in zip(probs, resp_ids):
        resp = tok.decode(r)
        text_ids = [tok.bos_token_id] + _ids(tok, prm_text(p.prompt, resp))
        n_prompt = 1 + len(p.prompt)
        data.append((text_ids, [-100] * n_prompt + task.char_labels(p, resp)))
    cfg = policy_config(tok, lab)
    cfg.num_labels = 2
    prm = Qwen2ForTokenClassification(cfg)
    missing = prm.model.load_state_dict(policy.model.state_dict(), strict=True)
    del missing
    opt = torch.optim.AdamW(prm.parameters(), lr=lab.prm_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / lab.prm_steps))
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    prm.train()
    for step in range(lab.prm_steps):
        batch = [data[rng.randrange(len(data))] for _ in range(lab.prm_batch_size)]
        ids = _pad([b[0] for b in batch], tok.pad_token_id)
        labels = _pad([b[1] for b in batch], -100)
        logits = prm(input_ids=ids, attention_mask=ids != tok.pad_token_id).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").reshape(labels.shape)
        valid = labels != -100
        at_sep = valid & (ids == sep)
        # separators (the step scores the PRM is read at) weigh as much as all other tokens together
        loss = (ce * valid).sum() / valid.sum() + (ce * at_sep).sum() / at_sep.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == lab.prm_steps - 1:
            _log(f"prm step {step + 1}/{lab.prm_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", log)
    prm.eval()
    return prm, data


@torch.no_grad()
def prm_step_metrics(prm, tok: CharTokenizer, data) -> dict:
    """Step accuracy and wrong-step recall of the PRM at separators on labelled PRM inputs."""
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    correct = total = wrong_hit = wrong = 0
    for i in range(0, len(data), 256):
        chunk = data[i:i + 256]
        ids = _pad([b[0] for b in chunk], tok.pad_token_id)
        labels = _pad([b[1] for b in chunk], -100)
        pred = prm(input_ids=ids, attention_mask=ids != tok.pad_token_id).logits.argmax(-1)
        m = (labels != -100) & (ids == sep)
        correct += int(((pred == labels) & m).sum())
        total += int(m.sum())
        wm = m & (labels == 0)
        wrong += int(wm.sum())
        wrong_hit += int(((pred == 0) & wm).sum())
    return {"step_accuracy": correct / max(total, 1), "wrong_step_recall": wrong_hit / max(wrong, 1),
            "steps": total, "wrong_steps": wrong}


def _save_atomic(save: Callable[[str], None], path: str):
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


PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "data", "lab")


def _lab_paths(root: str, lab: LabConfig) -> dict:
    base = os.path.join(root, lab.key("sft"))
    return {"policy": os.path.join(base, "policy"), "prm": os.path.join(base, "prm-" + lab.key()), "root": base}


def packaged_lab(lab: Optional[LabConfig] = None) -> Optional[dict]:
    """Paths of the lab checkpoints shipped with p2t for these settings (the defaults), or None."""
    paths = _lab_paths(PACKAGED_DIR, lab or LabConfig())
    ok = all(os.path.exists(os.path.join(paths[k], "config.json")) for k in ("policy", "prm"))
    return paths if ok else None


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
            _log(f"lab: using the packaged checkpoints {found['root']}", log)
            return found
    paths = _lab_paths(cache_dir or default_cache_dir(), lab)
    pol_dir, prm_dir = paths["policy"], paths["prm"]
    tok = lab_tokenizer()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions: a rebuild gives the same weights
    if not os.path.exists(os.path.join(pol_dir, "config.json")):
        _log(f"lab: training the SFT policy -> {pol_dir}", log)
        t0 = time.time()
        policy = train_sft(tok, lab, log)
        _save_atomic(lambda d: (policy.save_pretrained(d), tok.save_pretrained(d)), pol_dir)
        _log(f"lab: SFT done in {time.time() - t0:.0f}s", log)
    if not os.path.exists(os.path.join(prm_dir, "config.json")):
        from transformers import Qwen2ForCausalLM
        policy = Qwen2ForCausalLM.from_pretrained(pol_dir)
        _log(f"lab: training the PRM -> {prm_dir}", log)
        t0 = time.time()
        prm, data = train_prm(policy, tok, lab, log)
        metrics = prm_step_metrics(prm, tok, data[-512:])
        _log(f"lab: PRM done in {time.time() - t0:.0f}s; on its (training) samples: "
             f"step accuracy {metrics['step_accuracy']:.3f}, wrong-step recall {metrics['wrong_step_recall']:.3f}", log)

        def save(d):
            prm.save_pretrained(d)
            tok.save_pretrained(d)
            with open(os.path.join(d, "lab_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
        _save_atomic(save, prm_dir)
    torch.set_num_threads(torch_threads)
    return paths
