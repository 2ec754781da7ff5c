"""The lab's policy: a small ``Qwen2ForCausalLM`` warm-started by SFT on worked solutions whose addition
results are wrong ``sft_error_rate`` of the time, so that it samples a mix of right and wrong steps; and
sampling from it."""
from __future__ import annotations

import math
import random
import time
from typing import Callable, List, Optional, Sequence

import torch

from . import task
from .config import LabConfig, policy_config
from .layout import pad, token_ids
from .tokenizer import CharTokenizer


def log_to(log: Optional[Callable[[str], None]], msg: str):
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
            prompt = [tok.bos_token_id] + token_ids(tok, p.prompt)
            resp = token_ids(tok, task.solution(p, rng, lab.sft_error_rate, lab.ops_per_step)) + [tok.eos_token_id]
            rows.append(prompt + resp)
            labels.append([-100] * len(prompt) + resp)
        ids = pad(rows, tok.pad_token_id)
        lab_t = pad(labels, -100)
        out = model(input_ids=ids, attention_mask=(lab_t != -100) | (ids != tok.pad_token_id), labels=lab_t)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == lab.sft_steps - 1:
            log_to(log, f"sft step {step + 1}/{lab.sft_steps} loss {out.loss.item():.4f} ({time.time() - t0:.0f}s)")
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
