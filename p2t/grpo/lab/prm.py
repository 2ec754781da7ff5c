"""The lab's PRM: a ``Qwen2ForTokenClassification`` step classifier (2 labels, the ``step_classifier``
kind) on top of the SFT policy's layers, read at the step separators.

* ``prm_kind="verifier"`` (the default): built, not trained (:func:`verifier_prm`): layers on top of the
  policy's flag every written token the policy itself would not have written (some other token beat it
  in the policy's own prediction), gather the flags of each line at its separator, and a head calibrated
  on policy samples turns the line's flag into the step score.
* ``prm_kind="trained"``: the policy's layers (frozen by default) with fresh layers and a new head on top,
  trained on the SFT policy's own samples mixed with synthetic noisy solutions. Labels only at step
  separators are too sparse for a tiny model to learn from, so every response token also gets an
  auxiliary label "this line still matches a correct line so far".
"""
from __future__ import annotations

import math
import random
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import task
from .config import LabConfig, policy_config
from .layout import pad, prm_example
from .sft import log_to, lr_factor, sample
from .tokenizer import CharTokenizer


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
LINE_WINDOW = 16  # tokens before a separator the verifier of a several-additions line reads (4 x 4)


def verifier_tokens(lab: LabConfig):
    """(checked, rivals) of the verifier: with several additions a line, the joiner between them too."""
    extra = task.OP_JOINER if lab.ops_per_step > 1 else ""
    return VERIFIER_CHECKED + extra, VERIFIER_RIVALS + extra


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
    * with several additions a line (``ops_per_step > 1``) the line flag must cover the whole line and no
      more: layer ``L+1`` reads the flag and "is a separator" 0..3 tokens back and its MLP sums the flags
      after the last separator among them (products ``silu(M - B * separators) * flag``), plus a
      "separator among these four" channel; layer ``L+2`` does the same with those block sums 1, 5, 9, 13
      tokens back, so a separator sums the flags of the (up to ``LINE_WINDOW``) tokens of its own line;
    * the head scores "right" from the constant against the line flag (two weights, see
      :func:`calibrate_head`).

    The written token's log-probability under the policy separates wrong from right digits with AUROC
    0.9998 on the lab; a classifier trained on top of the frozen policy could not learn to read it in
    the time the build has (``benchmarks/results/lab_prm_probe.md``).
    """
    from transformers import Qwen2ForTokenClassification
    V, H, L = len(tok), lab.hidden_size, lab.num_layers
    code, logit, const, flag, line_flag = H, H + V, H + 2 * V, H + 2 * V + 1, H + 2 * V + 2
    checked, rivals = (tok.convert_tokens_to_ids(list(t)) for t in verifier_tokens(lab))
    units = [(v, w) for w in checked for v in rivals if v != w]
    multi = lab.ops_per_step > 1
    cfg = policy_config(tok, lab, 3 if multi else 2)
    cfg.head_dim = H // lab.num_heads
    cfg.hidden_size = H + 2 * V + 3 + (LINE_CHANNELS if multi else 0)
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
    if multi:
        sep_code = code + tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
        _line_layers(prm, L, H + 2 * V + 3, flag, const, line_flag, sep_code, c, hd, theta)
        prm.model.norm.weight[line_flag] = 1.0
        prm.model.norm.weight[const] = 1.0 / c
        return prm
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


LINE_CHANNELS = 18  # F_k, S_k (k < 4), block sum, block separator, G_m, H_m (m < 4)


def _gather_back(layer, src, src_norm, dst, offsets, const: int, one, hd: int, sharp: float, theta: float):
    """The attention half of a line layer: head k copies the two channels ``src`` (read by the input norm with
    weights ``src_norm``) from ``offsets[k]`` tokens back into channels ``dst[0] + k`` and ``dst[1] + k``; the
    post-attention norm passes those 8 channels (``dst[1] == dst[0] + 4``) and the constant as ``1 / rms``."""
    assert dst[1] == dst[0] + 4 and len(offsets) == 4
    for ch, w in zip(src, src_norm):
        layer.input_layernorm.weight[ch] = w
    heads = layer.self_attn.q_proj.weight.shape[0] // hd
    _offset_heads(layer.self_attn, hd, list(offsets) + [0.0] * (heads - 4), sharp, theta)
    for k in range(4):
        layer.self_attn.v_proj.weight[k * hd, src[0]] = 1.0
        layer.self_attn.v_proj.weight[k * hd + 1, src[1]] = 1.0
        layer.self_attn.o_proj.weight[dst[0] + k, k * hd] = 1.0
        layer.self_attn.o_proj.weight[dst[1] + k, k * hd + 1] = 1.0
    layer.post_attention_layernorm.weight[dst[0]:dst[0] + 8] = 1.0
    layer.post_attention_layernorm.weight[const] = one


def _line_layers(prm, L: int, base: int, flag: int, const: int, line_flag: int, sep_code: int, c, hd: int,
                 theta: float):
    """Layers ``L+1`` and ``L+2`` of the verifier of several-additions lines: ``line_flag`` at a separator
    becomes the sum of the flags of the tokens of its line (up to ``LINE_WINDOW`` back), each scaled by the
    norms it passed through. A product ``a * [no separator]`` is ``silu(gate) * a`` with ``gate = (M - B *
    separators) / rms``: about ``M / rms`` (silu linear) without a separator, very negative (silu 0) with one.
    """
    F, S, g1, h1, G, Hs = base, base + 4, base + 8, base + 9, base + 10, base + 14
    M, B, A_h, B2 = 250.0, 1e4, 10.0, 1e10
    sharp = 18.0  # a sharper offset than layer L's: a neighbour's separator must not leak into a mask
    one = 1.0 / c  # norm weight that turns the constant channel into 1 / rms
    # layer L+1: flags and separators 0..3 tokens back; sums of the flags after the last separator
    a = prm.model.layers[L + 1]
    _gather_back(a, (flag, sep_code), (1.0, one), (F, S), [0.0, 1.0, 2.0, 3.0], const, one, hd, sharp, theta)
    for k in range(4):
        a.mlp.gate_proj.weight[k, const] = M
        a.mlp.gate_proj.weight[k, S:S + k + 1] = -B
        a.mlp.up_proj.weight[k, F + k] = 1.0
        a.mlp.down_proj.weight[g1, k] = 1.0
    a.mlp.gate_proj.weight[4, S:S + 4] = A_h  # > 0 where a separator is among the four
    a.mlp.up_proj.weight[4, const] = 1.0
    a.mlp.down_proj.weight[h1, 4] = 1.0
    # layer L+2: block sums 1, 5, 9, 13 tokens back, each kept while no later block holds a separator
    b = prm.model.layers[L + 2]
    _gather_back(b, (g1, h1), (1.0, 1.0), (G, Hs), [1.0, 5.0, 9.0, 13.0], const, one, hd, sharp, theta)
    for m in range(4):
        b.mlp.gate_proj.weight[m, const] = M
        b.mlp.gate_proj.weight[m, Hs:Hs + m] = -B2
        b.mlp.up_proj.weight[m, G + m] = 1.0
        b.mlp.down_proj.weight[line_flag, m] = 1.0


def calibrate_head(prm, tok: CharTokenizer, data, lab: LabConfig, log=None):
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
            ids = pad([b[0] for b in chunk], tok.pad_token_id)
            labels = pad([b[1] for b in chunk], -100)
            prm(input_ids=ids, attention_mask=ids != tok.pad_token_id)
            m = (labels != -100) & (ids == sep)
            n = seen["n"].double()
            rho.append(n[..., const][m])
            flag.append(n[..., line_flag][m] / n[..., const][m])
            ys.append(labels[m].bool())
    hook.remove()
    rho, flag, y = torch.cat(rho), torch.cat(flag), torch.cat(ys)
    # several additions a line: the line flag passed through more norms; a wider grid, largest first (right
    # lines sit at <= 0, wrong ones far above: of equally good thresholds the largest keeps the head's
    # sharpness k moderate)
    grid = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2] if lab.ops_per_step == 1 else [10 ** (-e / 2) for e in range(4, 17)]
    acc = [float(((flag < t) == y).double().mean()) if len(y) else 0.0 for t in grid]
    tau = grid[int(np.argmax(acc))]
    ref = rho[y] if bool(y.any()) else rho  # (a policy that never writes a right step: any separator)
    k = math.log(0.95 / 0.05) / ((float(ref.median()) if len(ref) else 1.0) * tau)
    with torch.no_grad():
        prm.score.weight.zero_()
        prm.score.weight[1, const] = k * tau
        prm.score.weight[1, line_flag] = -k
    log_to(log, f"prm: verifier threshold {tau:g} (step accuracy on {len(y)} training separators "
                f"{max(acc):.3f}), sharpness {k:.3g}")


def build_prm(policy, tok: CharTokenizer, lab: LabConfig, log=None):
    """A step-classifier PRM from the SFT policy's weights, trained with per-token auxiliary labels."""
    from transformers import Qwen2ForTokenClassification
    torch.manual_seed(lab.seed + 1)
    rng = random.Random(lab.seed + 1)
    probs = [task.sample_problem(rng) for _ in range(lab.prm_samples)]
    t0 = time.time()
    resp_ids = sample(policy, tok, [p.prompt for p in probs], temperature=lab.prm_sample_temperature)
    log_to(log, f"prm: sampled {len(probs)} policy responses ({time.time() - t0:.0f}s)")
    data = [prm_example(tok, p, tok.decode(r), lab.ops_per_step) for p, r in zip(probs, resp_ids)]
    if lab.prm_kind == "verifier":
        prm = verifier_prm(policy, tok, lab)
        calibrate_head(prm, tok, data, lab, log)
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
            batch.append(prm_example(tok, p, task.solution(p, rng, lab.prm_synthetic_error_rate, lab.ops_per_step),
                                         lab.ops_per_step))
        ids = pad([b[0] for b in batch], tok.pad_token_id)
        labels = pad([b[1] for b in batch], -100)
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
            log_to(log, f"prm step {step + 1}/{lab.prm_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    for p in prm.parameters():
        p.requires_grad_(True)
    prm.eval()
    return prm, data
