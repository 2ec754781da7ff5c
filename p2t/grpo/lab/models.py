"""The lab's tiny policy and PRM: transformers models built from configs, trained here.

* Policy: a small ``Qwen2ForCausalLM`` warm-started by SFT on worked solutions whose step results are
  wrong ``sft_error_rate`` of the time, so it samples a mix of right and wrong steps.
* PRM: a ``Qwen2ForTokenClassification`` (2 labels, the ``step_classifier`` kind): the SFT policy's
  layers (frozen by default) with fresh layers and a new head on top. Labels only at step separators
  are too sparse for a tiny model to learn from, so every response token also gets an auxiliary label
  "this line still matches a correct line so far"; step scores are read at the separators. Trained on
  the SFT policy's own samples mixed with synthetic noisy solutions.

Both are saved with ``save_pretrained`` (plus the tokenizer) and cached by a hash of their settings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

    ``prm_kind="verifier"`` (the default) builds the PRM instead of training it: the policy's layers plus two
    layers on top that flag every written token some other token beat by more than ``prm_margin`` logits in
    the policy's own prediction, and a head calibrated on ``prm_samples`` policy samples (see
    :func:`verifier_prm`); ``prm_kind="trained"`` trains the classifier described above.
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


def policy_config(tok: CharTokenizer, lab: LabConfig, extra_layers: int = 0):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=len(tok), hidden_size=lab.hidden_size, num_hidden_layers=lab.num_layers + extra_layers,
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


def lr_factor(step: int, steps: int, warmup: int, lr: float, lr_min: float) -> float:
    """Multiplier of ``lr`` at ``step``: linear warm-up over ``warmup`` steps, then a cosine to ``lr_min``."""
    floor = min(1.0, lr_min / lr) if lr > 0 else 1.0
    cos = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    return min(1.0, (step + 1) / warmup) * cos


def train_sft(tok: CharTokenizer, lab: LabConfig, log=None):
    """SFT warm start on noisy worked solutions (loss on response tokens only)."""
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(lab.seed)
    model = Qwen2ForCausalLM(policy_config(tok, lab))
    opt = torch.optim.AdamW(model.parameters(), lr=lab.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, lab.sft_steps, 50, lab.sft_lr, lab.sft_lr_min))
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


def prm_example(tok: CharTokenizer, problem: task.Problem, response: str):
    """(PRM input ids, per-token labels) of one response: labels -100 on BOS and the prompt."""
    text_ids = [tok.bos_token_id] + _ids(tok, prm_text(problem.prompt, response))
    return text_ids, [-100] * (1 + len(problem.prompt)) + task.char_labels(problem, response)


def _offset_heads(attn, head_dim: int, offsets: Sequence[float], sharpness: float, rope_theta: float):
    """Queries and keys of ``attn`` set to constant biases whose rotary scores peak where the key is
    ``offsets[h]`` positions before the query (head ``h``)."""
    inv = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    q = torch.cat([torch.full((head_dim // 2,), sharpness, dtype=torch.float64),
                   torch.zeros(head_dim // 2, dtype=torch.float64)])
    attn.q_proj.weight.zero_()
    attn.k_proj.weight.zero_()
    attn.q_proj.bias.copy_(q.repeat(len(offsets)))
    attn.k_proj.bias.copy_(torch.cat([sharpness * torch.cat([torch.cos(o * inv), torch.sin(o * inv)]) for o in offsets]))


VERIFIER_CHECKED = "0123456789+=#"  # written tokens the verifier checks (a separator is never checked: the
#                                     PRM's trailing one stands where the policy writes EOS)
VERIFIER_RIVALS = "0123456789+=#\n"  # tokens whose policy logit may beat the written one


@torch.no_grad()
def verifier_prm(policy, tok: CharTokenizer, lab: LabConfig):
    """A step-classifier PRM that reads the policy's own prediction (built, not trained; head uncalibrated).

    ``Qwen2ForTokenClassification`` whose residual stream is the policy's (``H`` dims, the policy's layers
    copied, zero-padded, their norms rescaled for the wider mean) plus ``2V + 3`` side dimensions the
    policy's layers neither read nor write: a small code of the written token (1e-2 of the embedding's
    norm: the policy's RMS norms move by ~1e-4), a constant, and three channels the layers on top fill:

    * layer ``L`` (first on top): its heads attend to the previous token (constant rotary query/key
      biases) and write the policy's logits there (normalised last hidden state through the tied
      embedding); its MLP has one unit per (rival v, written w) pair, ``silu(beta (l_v - l_w - margin)) *
      [token is w]``, summed into a *flag*: > 0 where some rival beat the written token;
    * layer ``L+1``: four heads read the flag 0, 1, 2, 3 tokens back into a *line flag*, so a separator
      sees the result digits of its line;
    * the head scores "right" from the constant against the line flag (two weights, see
      :func:`train_prm`).

    The written token's log-probability under the policy separates wrong from right digits with AUROC
    0.9998 on the lab; a classifier trained on top of the frozen policy could not learn to read it in
    the time the build has (``benchmarks/results/lab_prm_probe.md``).
    """
    from transformers import Qwen2ForTokenClassification
    V, H, L = len(tok), lab.hidden_size, lab.num_layers
    code, logit, const, flag, line_flag = H, H + V, H + 2 * V, H + 2 * V + 1, H + 2 * V + 2
    checked = tok.convert_tokens_to_ids(list(VERIFIER_CHECKED))
    rivals = tok.convert_tokens_to_ids(list(VERIFIER_RIVALS))
    units = [(v, w) for w in checked for v in rivals if v != w]
    cfg = policy_config(tok, lab, 2)
    cfg.head_dim = H // lab.num_heads
    cfg.hidden_size = H + 2 * V + 3
    cfg.intermediate_size = max(lab.intermediate_size, len(units))
    cfg.num_labels = 2
    cfg.classifier_dropout = 0.0
    cfg.tie_word_embeddings = False
    if lab.num_heads < 4:  # the layer on top reads four offsets; the policy's layers leave extra heads at 0
        cfg.num_attention_heads = cfg.num_key_value_heads = 4
    prm = Qwen2ForTokenClassification(cfg)
    for p in prm.parameters():
        p.zero_()
    W = policy.model.embed_tokens.weight
    c = 1e-2 * W.norm(dim=1).mean()
    prm.model.embed_tokens.weight[:, :H] = W
    prm.model.embed_tokens.weight[:, code:code + V] = c * torch.eye(V)
    prm.model.embed_tokens.weight[:, const] = c
    widen = math.sqrt(H / cfg.hidden_size)  # RMS over the wider stream
    hd, nh = cfg.head_dim, lab.num_heads
    for i in range(L):
        src, dst = policy.model.layers[i], prm.model.layers[i]
        for name in ("q_proj", "k_proj", "v_proj"):
            rows = getattr(src.self_attn, name).weight.shape[0]
            getattr(dst.self_attn, name).weight[:rows, :H] = getattr(src.self_attn, name).weight
            getattr(dst.self_attn, name).bias[:rows] = getattr(src.self_attn, name).bias
        dst.self_attn.o_proj.weight[:H, :nh * hd] = src.self_attn.o_proj.weight
        inter = src.mlp.gate_proj.weight.shape[0]
        dst.mlp.gate_proj.weight[:inter, :H] = src.mlp.gate_proj.weight
        dst.mlp.up_proj.weight[:inter, :H] = src.mlp.up_proj.weight
        dst.mlp.down_proj.weight[:H, :inter] = src.mlp.down_proj.weight
        for name in ("input_layernorm", "post_attention_layernorm"):
            getattr(dst, name).weight[:H] = getattr(src, name).weight * widen
    theta = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    heads = cfg.num_attention_heads
    a = prm.model.layers[L]
    a.input_layernorm.weight[:H] = policy.model.norm.weight * widen
    _offset_heads(a.self_attn, hd, [1.0] * heads, 9.0, theta)
    a.self_attn.v_proj.weight[:nh * hd, :H] = torch.eye(H)[:nh * hd]
    a.self_attn.o_proj.weight[logit:logit + V, :nh * hd] = W[:, :nh * hd]
    a.post_attention_layernorm.weight[code:code + V] = 1.0 / c
    a.post_attention_layernorm.weight[logit:logit + V] = 1.0
    a.post_attention_layernorm.weight[const] = 1.0
    beta = 20.0
    for u, (v, w) in enumerate(units):
        a.mlp.gate_proj.weight[u, logit + v] = beta
        a.mlp.gate_proj.weight[u, logit + w] = -beta
        a.mlp.gate_proj.weight[u, const] = -beta * lab.prm_margin / c
        a.mlp.up_proj.weight[u, code + w] = 1.0
        a.mlp.down_proj.weight[flag, u] = 1.0
    b = prm.model.layers[L + 1]
    b.input_layernorm.weight[flag] = 1.0
    _offset_heads(b.self_attn, hd, [0.0, 1.0, 2.0, 3.0][:heads] + [0.0] * max(0, heads - 4), 9.0, theta)
    for h in range(min(heads, 4)):
        b.self_attn.v_proj.weight[h * hd, flag] = 1.0
        b.self_attn.o_proj.weight[line_flag, h * hd] = 1.0
    b.post_attention_layernorm.weight.fill_(1.0)
    prm.model.norm.weight[line_flag] = 1.0
    prm.model.norm.weight[const] = 1.0 / c
    return prm


def _calibrate_head(prm, tok: CharTokenizer, data, lab: LabConfig, log=None):
    """Set the verifier's head: logit("right") - logit("wrong") = k * rho * (tau - line flag), rho the final
    norm's scale (the head reads the constant as rho and the line flag as rho * flag). ``tau`` is the
    threshold on the separators of ``data`` with the best step accuracy (from a fixed grid); ``k`` makes
    the median right step score 0.95."""
    V, H = len(tok), lab.hidden_size
    const, line_flag = H + 2 * V, H + 2 * V + 2
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    seen = {}
    hook = prm.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("n", o.detach()))
    rho, flag, ys = [], [], []
    with torch.no_grad():
        for i in range(0, len(data), 256):
            chunk = data[i:i + 256]
            ids = _pad([b[0] for b in chunk], tok.pad_token_id)
            labels = _pad([b[1] for b in chunk], -100)
            prm(input_ids=ids, attention_mask=ids != tok.pad_token_id)
            m = (labels != -100) & (ids == sep)
            n = seen["n"].double()
            rho.append(n[..., const][m])
            flag.append(n[..., line_flag][m] / n[..., const][m])
            ys.append(labels[m].bool())
    hook.remove()
    rho, flag, y = torch.cat(rho), torch.cat(flag), torch.cat(ys)
    grid = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    acc = [float(((flag < t) == y).double().mean()) if len(y) else 0.0 for t in grid]
    tau = grid[int(np.argmax(acc))]
    ref = rho[y] if bool(y.any()) else rho  # (a policy that never writes a right step: any separator)
    k = math.log(0.95 / 0.05) / ((float(ref.median()) if len(ref) else 1.0) * tau)
    with torch.no_grad():
        prm.score.weight.zero_()
        prm.score.weight[1, const] = k * tau
        prm.score.weight[1, line_flag] = -k
    _log(f"prm: verifier threshold {tau:g} (step accuracy on {len(y)} training separators "
         f"{max(acc):.3f}), sharpness {k:.3g}", log)


def train_prm(policy, tok: CharTokenizer, lab: LabConfig, log=None):
    """A step-classifier PRM from the SFT policy's weights, trained with per-token auxiliary labels."""
    from transformers import Qwen2ForTokenClassification
    torch.manual_seed(lab.seed + 1)
    rng = random.Random(lab.seed + 1)
    probs = [task.sample_problem(rng) for _ in range(lab.prm_samples)]
    t0 = time.time()
    resp_ids = sample(policy, tok, [p.prompt for p in probs], temperature=lab.prm_sample_temperature)
    _log(f"prm: sampled {len(probs)} policy responses ({time.time() - t0:.0f}s)", log)
    data = [prm_example(tok, p, tok.decode(r)) for p, r in zip(probs, resp_ids)]
    if lab.prm_kind == "verifier":
        prm = verifier_prm(policy, tok, lab)
        _calibrate_head(prm, tok, data, lab, log)
        prm.eval()
        return prm, data
    if lab.prm_kind != "trained":
        raise ValueError(f"prm_kind must be 'verifier' or 'trained', got {lab.prm_kind!r}")
    cfg = policy_config(tok, lab, lab.prm_extra_layers)
    cfg.num_labels = 2
    prm = Qwen2ForTokenClassification(cfg)
    # the policy's layers (and embeddings) at the bottom, prm_extra_layers fresh layers on top
    keys = prm.model.load_state_dict(policy.model.state_dict(), strict=False)
    assert not keys.unexpected_keys and all(k.startswith("layers.") for k in keys.missing_keys), keys
    if not lab.prm_train_base:  # keep the policy's arithmetic: train the fresh layers and the head only
        fresh = {f"model.layers.{i}." for i in range(lab.num_layers, lab.num_layers + lab.prm_extra_layers)}
        for name, p in prm.named_parameters():
            p.requires_grad_(name.startswith("score.") or name.startswith("model.norm.")
                             or any(name.startswith(f) for f in fresh))
    opt = torch.optim.AdamW([p for p in prm.parameters() if p.requires_grad], lr=lab.prm_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, lab.prm_steps, 20, lab.prm_lr, lab.prm_lr_min))
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    n_syn = int(round(lab.prm_synthetic * lab.prm_batch_size))
    prm.train()
    for step in range(lab.prm_steps):
        batch = [data[rng.randrange(len(data))] for _ in range(lab.prm_batch_size - n_syn)]
        for _ in range(n_syn):
            p = task.sample_problem(rng)
            batch.append(prm_example(tok, p, task.solution(p, rng, lab.prm_synthetic_error_rate)))
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
    for p in prm.parameters():
        p.requires_grad_(True)
    prm.eval()
    return prm, data


def wrong_step_kinds(problem: task.Problem, response: str) -> List[str]:
    """What each wrong step of ``response`` got wrong: the result's offset from the right one (``"+1"``,
    ``"-10"``, ...) when the operands are right, else ``"answer"`` (a wrong ``#X`` line), ``"extra"`` (a line
    after the answer) or ``"malformed"``."""
    out = []
    for line, want in zip(response.split(task.STEP_SEPARATOR), task.expected_lines(problem, response)):
        if want is not None and line == want:
            continue
        m, w = task._LINE.match(line), task._LINE.match(want or "")
        if want == "":
            out.append("extra")
        elif m and w and m.group(1) == w.group(1) and m.group(2) == w.group(2):
            out.append(f"{int(m.group(3)) - int(w.group(3)):+d}")
        elif want is not None and want.startswith("#"):
            out.append("answer")
        else:
            out.append("malformed")
    return out


@torch.no_grad()
def policy_report(policy, tok: CharTokenizer, lab: LabConfig) -> dict:
    """The SFT policy on ``report_samples`` held-out problems: sampled (temperature 1) and greedy accuracy,
    the share of wrong steps and what the wrong steps got wrong (compare with the SFT noise: -10, -2, -1,
    +1, +2, +10 with equal odds)."""
    probs = task.problems(lab.seed + 2, lab.report_samples)
    prompts = [p.prompt for p in probs]
    torch.manual_seed(lab.seed + 2)
    sampled = [tok.decode(r) for r in sample(policy, tok, prompts, temperature=1.0)]
    greedy = [tok.decode(r) for r in sample(policy, tok, prompts, temperature=0.0)]
    acc = lambda resp: sum(task.outcome_reward(prompts, resp)) / max(len(prompts), 1)  # noqa: E731
    steps = [l for p, r in zip(probs, sampled) for l in task.step_labels(p, r)]
    kinds: dict = {}
    for p, r in zip(probs, sampled):
        for k in wrong_step_kinds(p, r):
            kinds[k] = kinds.get(k, 0) + 1
    n_wrong = max(sum(kinds.values()), 1)
    return {"sampled_accuracy": acc(sampled), "greedy_accuracy": acc(greedy),
            "wrong_step_share": 1 - sum(steps) / max(len(steps), 1), "steps": len(steps),
            "wrong_step_kinds": {k: round(v / n_wrong, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "samples": len(probs)}


@torch.no_grad()
def prm_step_metrics(prm, tok: CharTokenizer, data) -> dict:
    """Step accuracy, wrong-step recall and the AUROC of the step score for "wrong step" (how well R_s
    ranks wrong below right steps, whatever the threshold) of the PRM at separators on labelled inputs."""
    from .localisation import auroc
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    correct = total = wrong_hit = wrong = 0
    p_right, p_wrong = [], []
    for i in range(0, len(data), 256):
        chunk = data[i:i + 256]
        ids = _pad([b[0] for b in chunk], tok.pad_token_id)
        labels = _pad([b[1] for b in chunk], -100)
        logits = prm(input_ids=ids, attention_mask=ids != tok.pad_token_id).logits.float()
        pred = logits.argmax(-1)
        prob = torch.softmax(logits, -1)[..., 1]
        m = (labels != -100) & (ids == sep)
        correct += int(((pred == labels) & m).sum())
        total += int(m.sum())
        wm = m & (labels == 0)
        wrong += int(wm.sum())
        wrong_hit += int(((pred == 0) & wm).sum())
        p_wrong += prob[wm].tolist()
        p_right += prob[m & (labels == 1)].tolist()
    return {"step_accuracy": correct / max(total, 1), "wrong_step_recall": wrong_hit / max(wrong, 1),
            "right_step_recall": (correct - wrong_hit) / max(total - wrong, 1),
            "step_auroc": auroc(-np.array(p_wrong), -np.array(p_right)), "steps": total, "wrong_steps": wrong}


@torch.no_grad()
def prm_report(prm, policy, tok: CharTokenizer, lab: LabConfig) -> dict:
    """PRM step metrics on ``report_samples`` fresh samples of the SFT policy (problems not trained on)."""
    probs = task.problems(lab.seed + 3, lab.report_samples)
    torch.manual_seed(lab.seed + 3)
    resp = sample(policy, tok, [p.prompt for p in probs], temperature=lab.prm_sample_temperature)
    out = prm_step_metrics(prm, tok, [prm_example(tok, p, tok.decode(r)) for p, r in zip(probs, resp)])
    out["samples"] = len(probs)
    return out


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in list(kinds.items())[:8])


def _save_model(d: str, model, tok: CharTokenizer, metrics: dict):
    """A lab checkpoint: the model, its tokenizer and the build's measurements (``lab_metrics.json``)."""
    model.save_pretrained(d)
    tok.save_pretrained(d)
    with open(os.path.join(d, "lab_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


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
        t_sft = time.time() - t0
        report = policy_report(policy, tok, lab)
        _log(f"lab: SFT done in {t_sft:.0f}s; on {report['samples']} held-out problems: sampled accuracy "
             f"{report['sampled_accuracy']:.3f}, greedy {report['greedy_accuracy']:.3f}, wrong steps "
             f"{report['wrong_step_share']:.3f} ({_kinds(report['wrong_step_kinds'])})", log)
        _save_atomic(lambda d: _save_model(d, policy, tok, report), pol_dir)
    if not os.path.exists(os.path.join(prm_dir, "config.json")):
        from transformers import Qwen2ForCausalLM
        policy = Qwen2ForCausalLM.from_pretrained(pol_dir)
        how = ("building the verifier PRM on the SFT policy" if lab.prm_kind == "verifier"
               else "training the PRM")
        _log(f"lab: {how} -> {prm_dir}", log)
        t0 = time.time()
        prm, _ = train_prm(policy, tok, lab, log)
        metrics = prm_report(prm, policy, tok, lab)
        _log(f"lab: PRM done in {time.time() - t0:.0f}s; on {metrics['samples']} fresh policy samples: step "
             f"accuracy {metrics['step_accuracy']:.3f}, wrong-step recall {metrics['wrong_step_recall']:.3f}, "
             f"right-step recall {metrics['right_step_recall']:.3f}, AUROC {metrics['step_auroc']:.3f}", log)
        _save_atomic(lambda d: _save_model(d, prm, tok, metrics), prm_dir)
    torch.set_num_threads(torch_threads)
    return paths
