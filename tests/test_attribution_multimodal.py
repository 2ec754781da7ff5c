"""Vision-language PRMs (:class:`MultimodalP2TScorer`) on tiny random-init LLaVA and Qwen2-VL models,
saved with save_pretrained (model, image processor, tokenizer) and loaded back: the merged embeddings
are the model's own, taylor equals manual autograd on them, exact equals the leave-one-out loop, the
image positions get no attribution and no step, the image changes the rewards, and bad inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from _attribution_models import char_tokenizer

PROMPTS = ["What is shown? 6*7=", "Count the dots."]
RESPONSES = ["6*7=42\nso 42", "3 dots\n#3"]
LAYOUT = dict(template="{prompt} {response}", step_separator="\n", step_split="\n", judge_tokens=("+", "-"))
ARCHS = ("llava", "qwen2_vl")


def _image(seed, size=(40, 50)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def save_vlm(arch: str, directory: str, seed: int = 0):
    """A tiny random vision-language causal LM of ``arch``, its image processor and a character
    tokenizer with an ``<image>`` token, saved under ``directory``; returns (model dir, tokenizer dir)."""
    tok = char_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    V, img = len(tok), tok.convert_tokens_to_ids("<image>")
    text = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=256)
    torch.manual_seed(seed)
    if arch == "llava":
        from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=LlamaConfig(**text),
                                                          image_token_id=img, vision_feature_layer=-1,
                                                          vision_feature_select_strategy="default"))
        proc = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        cfg = Qwen2VLConfig(text_config=dict(**text, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                            image_token_id=img, video_token_id=img, vision_start_token_id=img,
                            vision_end_token_id=img, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        model = Qwen2VLForConditionalGeneration(cfg)
        proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84, patch_size=14, merge_size=2,
                                        temporal_patch_size=2)
    with torch.no_grad():  # a larger init so that the tiny PRM's outputs vary with the input
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    tok.save_pretrained(os.path.join(directory, "tokenizer"))
    return directory, os.path.join(directory, "tokenizer")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {a: save_vlm(a, str(root / a), seed=i) for i, a in enumerate(ARCHS)}


def load(saved, arch, **options):
    from p2t.attribution.multimodal import MultimodalP2TScorer
    d, tok = saved[arch]
    return MultimodalP2TScorer.from_pretrained(d, tokenizer=tok, **{**LAYOUT, **options})


IMAGES = [_image(1), _image(2, (56, 56))]


def close(a, b, tol=2e-5):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err}"


def merged(s, view, image):
    """The model's own merged inputs of one PRM input: its embedding of the ids, its image features
    scattered by its own placeholder mask, its own positions (Qwen2-VL's 3-D rotary index)."""
    m = s.model
    ids = torch.tensor([view.input_ids])
    pix = dict(s.image_processor(images=image, return_tensors="pt"))
    feats = torch.cat(list(m.get_image_features(**pix).pooler_output))
    x = m.get_input_embeddings()(ids)
    inner = m.model
    mask = inner.get_placeholder_mask(ids, inputs_embeds=x, image_features=feats)
    mask = mask[0] if isinstance(mask, tuple) else mask
    x = x.masked_scatter(mask, feats)[0].detach()
    pos = None
    if hasattr(inner, "get_rope_index"):
        pos, _ = inner.get_rope_index(ids, mm_token_type_ids=(ids == s.image_token_id).int(),
                                      image_grid_thw=pix["image_grid_thw"])
    return x, pos, pix, ids


def objective(s, view, pos):
    tok = s.tokenizer
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")

    def f(x):
        kw = {} if pos is None else dict(position_ids=pos)
        logits = s.model(inputs_embeds=x[None], **kw).logits[0].float()[view.readout_positions]
        return logits[:, plus] - logits[:, minus]
    return f


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_embeddings_are_the_models_own(saved, arch):
    """Logits from our merged inputs_embeds equal the model's forward on ids + pixel values."""
    s = load(saved, arch)
    b = s.score(PROMPTS, RESPONSES, images=IMAGES)
    v = b.prm[0]
    x, pos, pix, ids = merged(s, v, IMAGES[0])
    with torch.no_grad():
        extra = {"mm_token_type_ids": (ids == s.image_token_id).int()} if arch == "qwen2_vl" else {}
        ref = s.model(input_ids=ids, **pix, **extra).logits[0]
        got = s.model(inputs_embeds=x[None], **({} if pos is None else dict(position_ids=pos))).logits[0]
    close(got, ref, 1e-5)
    plus, minus = s.tokenizer.convert_tokens_to_ids("+"), s.tokenizer.convert_tokens_to_ids("-")
    m = ref[v.readout_positions][:, plus] - ref[v.readout_positions][:, minus]
    close(v.step_logits, m, 1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_taylor_is_autograd_on_merged_embeddings(saved, arch):
    s = load(saved, arch)
    b = s.score(PROMPTS, RESPONSES, images=IMAGES)
    null = s.null_embedding
    for i, img in enumerate(IMAGES):
        v = b.prm[i]
        x, pos, _, ids = merged(s, v, img)
        xg = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(objective(s, v, pos)(xg).sum(), xg)
        steps = v.step_index >= 0
        want = ((x - null) * g).sum(-1) * steps
        assert want.abs().sum() > 0
        close(v.attributions, want)
        # image positions: every feature's placeholder, in no step, attribution exactly 0
        img_pos = ids[0] == s.image_token_id
        assert int(img_pos.sum()) == s._features([img])[0][0].shape[0] > 1
        assert (v.step_index[img_pos] == -1).all() and (v.attributions[img_pos] == 0).all()
        assert v.prompt_length > int(img_pos.nonzero().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_is_the_leave_one_out_loop(saved, arch):
    s = load(saved, arch)
    b = s.score(PROMPTS[:1], RESPONSES[:1], images=IMAGES[:1], method="exact")
    v = b.prm[0]
    x, pos, _, _ = merged(s, v, IMAGES[0])
    f = objective(s, v, pos)
    want = torch.zeros(x.shape[0])
    with torch.no_grad():
        f0 = f(x).sum()
        for p in (v.step_index >= 0).nonzero().flatten().tolist():
            xx = x.clone()
            xx[p] = s.null_embedding
            want[p] = f0 - f(xx).sum()
    assert want.abs().sum() > 0
    close(v.attributions, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_image_changes_rewards_and_text_rows_mix(saved, arch):
    """Another image changes the step rewards; a text-only prompt in the same batch scores as alone."""
    s = load(saved, arch)
    a = s.score(PROMPTS, RESPONSES, images=IMAGES)
    c = s.score(PROMPTS, RESPONSES, images=[_image(7), IMAGES[1]])
    assert not torch.allclose(a.segment_logits[:2], c.segment_logits[:2])
    mixed = s.score(PROMPTS, RESPONSES, images=[None, IMAGES[1]])
    alone = s.score(PROMPTS[:1], RESPONSES[:1])
    close(mixed.scores[0, :alone.scores.shape[1]], alone.scores[0])
    assert s.image_token_id not in mixed.prm[0].input_ids
    # the policy-token output: segments and attributions on the response text as for a text PRM
    assert a.segment_ids.shape == (2, max(len(r) for r in RESPONSES))


def test_tensor_images_and_score_ids(saved, tmp_path):
    """An image tensor (channels first) or file path is accepted, and the ids-in entry point takes
    images too."""
    s = load(saved, "llava")
    t = torch.from_numpy(np.asarray(IMAGES[0])).permute(2, 0, 1).contiguous()
    a = s.score(PROMPTS[:1], RESPONSES[:1], images=[IMAGES[0]])
    b = s.score(PROMPTS[:1], RESPONSES[:1], images=[t])
    close(b.scores, a.scores, 1e-5)
    ids = [s.tokenizer.encode(RESPONSES[0], add_special_tokens=False)]
    c = s.score_ids(PROMPTS[:1], ids, images=[IMAGES[0]])
    close(c.scores, a.scores, 1e-5)
    path = tmp_path / "a.png"  # an image file (PNG is lossless: the same pixels)
    IMAGES[0].save(path)
    close(s.score(PROMPTS[:1], RESPONSES[:1], images=[str(path)]).scores, a.scores, 1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_rewards_and_advantages_read_the_images(saved, arch):
    """rewards_ids and advantages_ids take images= and score the PRM on image and text, as score_ids does
    (before, they were inherited from the text scorer and ran the PRM on the text alone). The fused
    advantages run on the merged embeddings and equal the unfused ones computed from score_ids."""
    import p2t
    s = load(saved, arch)
    ids = [s.tokenizer.encode(r, add_special_tokens=False) for r in RESPONSES]
    full = s.score_ids(PROMPTS, ids, images=IMAGES)
    text = s.score_ids(PROMPTS, ids)
    assert not torch.allclose(full.segment_logits, text.segment_logits)
    r = s.rewards_ids(PROMPTS, ids, images=IMAGES)
    close(r.segment_logits, full.segment_logits, 1e-5)
    assert (r.scores == 0).all()
    o = torch.tensor([1.0, 0.0])
    opts = p2t.P2TOptions(alpha=0.5, omega=0.8)
    assert s.fuses("taylor", opts)
    f = s.advantages_ids(PROMPTS, ids, o, group_size=2, options=opts, images=IMAGES)
    close(f.segment_logits, full.segment_logits, 1e-5)
    close(f.scores, full.scores, 1e-4)
    want = p2t.rewards.token_advantages_of(full, o, opts, group_size=2)
    close(f.advantages, want, 1e-5)
    u = s.advantages_ids(PROMPTS, ids, o, group_size=2, options=opts, images=IMAGES, mode="process")
    close(u.advantages, p2t.rewards.token_advantages_of(full, o, opts, group_size=2, mode="process"), 1e-5)


def test_bad_inputs(saved):
    s = load(saved, "llava")
    with pytest.raises(ValueError, match="images has 1 entries"):
        s.score(PROMPTS, RESPONSES, images=IMAGES[:1])
    with pytest.raises(TypeError, match="images"):
        s.score(PROMPTS, RESPONSES, images=IMAGES[0])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        s.score(PROMPTS, RESPONSES, images=[3.5, None])
    with pytest.raises(OSError):
        s.score(PROMPTS, RESPONSES, images=["no/such/image.png", None])
    with pytest.raises(ValueError, match="no image was given"):
        s.score(["<image>" + PROMPTS[0]], RESPONSES[:1])
    with pytest.raises(ValueError, match="packing"):
        load(saved, "llava", packing=True)
    n = len(s.score(PROMPTS[:1], RESPONSES[:1], images=IMAGES[:1]).prm[0].input_ids)
    with pytest.raises(ValueError, match="max_length"):  # the image features count against the PRM's length
        load(saved, "llava", max_length=n - 1).score(PROMPTS[:1], RESPONSES[:1], images=IMAGES[:1])
    from p2t.attribution.multimodal import MultimodalP2TScorer
    from transformers import LlamaConfig, LlamaForCausalLM
    with pytest.raises(TypeError, match="vision-language"):
        MultimodalP2TScorer(LlamaForCausalLM(LlamaConfig(vocab_size=len(s.tokenizer), hidden_size=16,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=16)),
                            s.tokenizer, image_processor=s.image_processor, **LAYOUT)


def test_cli_image(saved, tmp_path, capsys):
    """`p2t attribute --image` scores records with the image (a record's own "image" path wins)."""
    from p2t.cli import main
    d, tok = saved["llava"]
    img = tmp_path / "a.png"
    IMAGES[0].save(img)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(dict(prompt=p, response=r)) + "\n" for p, r in zip(PROMPTS, RESPONSES)))
    html = tmp_path / "out.html"
    rc = main(["attribute", str(data), "--prm", d, "--kind", "lm_judge", "--tokenizer", tok, "--image", str(img),
               "--template", "{prompt} {response}", "--separator", r"\n", "--step-split", r"\n", "--no-color",
               "--html", str(html)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "2 responses" in out.out and html.exists()
    rc = main(["attribute", str(data), "--prm", d, "--kind", "lm_judge", "--tokenizer", tok, "--image",
               str(tmp_path / "missing.png"), "--no-color", "--html", str(html)])
    assert rc == 2 and "missing.png" in capsys.readouterr().err
    rc = main(["attribute", str(data), "--image", str(img), "--no-color", "--html", str(html)])
    assert rc == 2 and "vision-language" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_per_step_and_readout_head(saved, arch):
    """taylor_per_step = each step's own gradient on the merged embeddings; the judge read at the step
    tags only (judge_logits="readout") gives the full head's scores."""
    s = load(saved, arch)
    b = s.score(PROMPTS[:1], RESPONSES[:1], images=IMAGES[:1], method="taylor_per_step")
    v = b.prm[0]
    x, pos, _, _ = merged(s, v, IMAGES[0])
    want = torch.zeros(x.shape[0])
    for k in range(len(v.readout_positions)):
        xg = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(objective(s, v, pos)(xg)[k], xg)
        tok = v.step_index == k
        want[tok] = ((x - s.null_embedding) * g).sum(-1)[tok]
    close(v.attributions, want)
    full = s.score(PROMPTS, RESPONSES, images=IMAGES)
    got = load(saved, arch, judge_logits="readout").score(PROMPTS, RESPONSES, images=IMAGES)
    close(got.scores, full.scores, 1e-5)


def test_grpo_step_with_a_vision_language_prm(tmp_path):
    """The GRPO loop reads each prompt's image file from the train data (``prm_image_column``) and its
    token rewards come from the vision-language PRM's attributions."""
    from p2t.grpo import GRPOTrainer
    from p2t.grpo.lab.models import ensure_lab

    from _grpo_helpers import TINY_LAB, digit_reward, tiny_config
    d, tokdir = save_vlm("llava", str(tmp_path / "vlm"), seed=5)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tokdir).save_pretrained(d)  # the PRM's tokenizer next to it, as shipped
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"img{i}.png"))
        _image(10 + i).save(paths[-1])
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(dict(prompt=p, image=im)) + "\n" for p, im in zip(["12+7=", "30+4="], paths)))
    cache = tmp_path / "lab"
    ensure_lab(TINY_LAB, str(cache))
    cfg = tiny_config(tmp_path, cache, mode="p2t", prm=d, prm_kind="lm_judge", prm_image_column="image",
                      train_data=str(data), reward="_grpo_helpers:digit_reward",
                      prm_template="{prompt} {response}", step_separator="\n", step_split="\n")
    tr = GRPOTrainer(cfg, reward_fn=digit_reward)
    from p2t.attribution import MultimodalP2TScorer
    assert isinstance(tr.scorer, MultimodalP2TScorer)
    tr.step()
    r = tr.last_rollout
    assert torch.isfinite(r.advantages).all()
    scored = [i for i, v in enumerate(r.scored.prm) if v is not None]
    assert scored and all(tr.scorer.image_token_id in r.scored.prm[i].input_ids for i in scored)
    assert r.scored.scores.abs().sum() > 0
    bad = tiny_config(tmp_path, cache, mode="p2t", prm=d, prm_kind="lm_judge", prm_image_column="picture",
                      train_data=str(data), reward="_grpo_helpers:digit_reward",
                      prm_template="{prompt} {response}", step_separator="\n", step_split="\n")
    with pytest.raises(ValueError, match="picture"):
        GRPOTrainer(bad, reward_fn=digit_reward).step()
