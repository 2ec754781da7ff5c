"""Vision-language PRMs: step rewards that read an image and text, attributed to the text only.

A VisualPRM-style judge (transformers' ``*ForConditionalGeneration`` classes: LLaVA, Qwen2-VL and
their kin) takes ``pixel_values`` with ``input_ids`` and writes the image features into
``inputs_embeds`` at its image placeholder tokens. :class:`MultimodalP2TScorer` builds those merged
embeddings itself, once per micro-batch, and runs the language model on them:

1. each prompt that carries an image (a PIL image or an image tensor, one per prompt, ``None`` for a
   text-only prompt) gets the model's image token at its start (unless the prompt already holds it);
   the image goes through the image processor and ``model.get_image_features`` once (no gradient);
2. the PRM input is built as for a text PRM (:mod:`.layout`), then the image token is repeated as many
   times as the image has features (what the model's processor does);
3. ``inputs_embeds`` = the token embeddings with the image features scattered over the placeholder
   positions (``masked_scatter``, as the model's own forward does); models with multimodal rotary
   positions (Qwen2-VL: ``get_rope_index``) get their 3-D ``position_ids`` computed from the ids and
   the image grids and passed explicitly;
4. every attribution method differentiates the step objectives w.r.t. these embeddings and reduces
   on the step (text) positions only: the image positions are in the prompt, in no step, and get
   attribution 0 (their gradient is never read). The map onto the policy's tokens is the text PRM's.

Packing is not combined with images (``packing=True`` is refused).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from .engine import Engine, embedding
from .layout import Row
from .scorer import P2TScorer

__all__ = ["MultimodalP2TScorer"]


def _image_token_id(model) -> int:
    cfg = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"the PRM ({type(model).__name__}) has no config.image_token_id: not a vision-language model "
                     "whose inputs_embeds merge image features")


def _rope_owner(model):
    """The module with ``get_rope_index`` (multimodal rotary positions), or ``None``."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and callable(getattr(m, "get_rope_index", None)):
            return m
    return None


class Images:
    """The image features of the current call (``features``: per prompt ``(features [n, H], processor
    extras)`` or ``None``; set for the duration of one call), the rows with their image token expanded, and
    the merged ``inputs_embeds`` of a micro-batch (the engine's ``embeds``)."""

    def __init__(self, model, image_token_id: int, max_length: Optional[int]):
        self.model, self.image_token_id, self.max_length = model, image_token_id, max_length
        self.rope = _rope_owner(model)
        self.features: Optional[list] = None

    def expand(self, r: Row) -> Row:
        """The row with its image token repeated once per image feature (positions after it shifted)."""
        got = None if self.features is None else self.features[r.index]
        at = np.nonzero(r.input_ids[:r.prompt_length] == self.image_token_id)[0]
        if got is None:
            if at.size:
                raise ValueError(f"prompts[{r.index}]: the PRM input holds the image token but no image was given")
            return r
        if at.size != 1:
            raise ValueError(f"prompts[{r.index}]: the PRM input holds the image token {at.size} times, expected once "
                             "(the template must not add another)")
        n, p = int(got[0].shape[0]), int(at[0])
        extra = n - 1
        if self.max_length is not None and r.length + extra > self.max_length:
            raise ValueError(f"responses[{r.index}]: the PRM input has {r.length + extra} tokens with its {n} image "
                             f"features, more than max_length={self.max_length}")
        shift = lambda a: np.where(a >= p + 1, a + extra, a)  # noqa: E731 - positions after the image token
        ids = np.concatenate([r.input_ids[:p], np.full(n, self.image_token_id, dtype=np.int64), r.input_ids[p + 1:]])
        step = np.concatenate([r.token_step[:p], np.full(n, -1, dtype=np.int64), r.token_step[p + 1:]])
        return dataclasses.replace(r, input_ids=ids, token_step=step, readout=shift(r.readout),
                                   prompt_length=r.prompt_length + extra, map_prm=shift(r.map_prm))

    def embeds(self, rows: List[Row], t: dict, inputs: dict) -> torch.Tensor:
        """The token embeddings with the image features scattered over the placeholder positions; 3-D
        ``position_ids`` added to ``inputs`` for multimodal rotary positions."""
        ids = t["input_ids"]
        x = embedding(self.model)(ids)
        mask = ids == self.image_token_id
        got = [self.features[r.index] for r in rows if self.features is not None and self.features[r.index] is not None]
        if got:
            feats = torch.cat([f for f, _ in got]).to(device=x.device, dtype=x.dtype)
            x = x.masked_scatter(mask[..., None], feats)
        if self.rope is not None:
            extras = {}
            for key in ("image_grid_thw",):
                parts = [e[key] for _, e in got if key in e]
                if parts:
                    extras[key] = torch.cat(parts).to(ids.device)
            pos, _ = self.rope.get_rope_index(ids, mm_token_type_ids=mask.int(), attention_mask=t["attention_mask"],
                                              **extras)
            inputs["position_ids"] = pos
        return x


class ImageLayout:
    """A text :class:`~p2t.attribution.layout.Layout` whose rows have their image token expanded
    (:meth:`Images.expand`); everything else is the text layout's."""

    def __init__(self, text, images: Images):
        self.text, self.images = text, images

    def __getattr__(self, name):
        return getattr(self.text, name)

    def rows(self, *args, **kwargs) -> List[Optional[Row]]:
        return [None if r is None else self.images.expand(r) for r in self.text.rows(*args, **kwargs)]


class MultimodalP2TScorer(P2TScorer):
    """:class:`P2TScorer` for a PRM whose inputs merge image features and text.

    Args:
        model: a vision-language model with ``get_image_features(**pixel_inputs)`` and
            ``config.image_token_id`` whose forward accepts ``inputs_embeds`` (e.g.
            ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``).
        tokenizer: its tokenizer (it must know the image token).
        kind: as for :class:`P2TScorer` (``"lm_judge"`` by default: VisualPRM reads ``+``/``-``).
        image_processor: turns one image into the model's pixel inputs (``pixel_values`` and, for
            Qwen2-VL, ``image_grid_thw``); called as ``image_processor(images=image, return_tensors="pt")``.
        image_token: the image placeholder's text (default: the tokenizer's text of ``config.image_token_id``).
        Other options as for :class:`P2TScorer` (``packing`` excepted).

    :meth:`score`, :meth:`score_ids`, :meth:`rewards_ids` and :meth:`advantages_ids` take ``images=``: one
    image (PIL image, tensor or image file path) or ``None`` per prompt.
    """

    def __init__(self, model, tokenizer, kind="lm_judge", *, image_processor, image_token: Optional[str] = None,
                 **options):
        if options.get("packing"):
            raise ValueError("packing=True is not supported with images: use packing=False")
        if image_processor is None or not callable(image_processor):
            raise TypeError(f"image_processor must be callable (a transformers image processor), got "
                            f"{type(image_processor).__name__}")
        if not callable(getattr(model, "get_image_features", None)):
            raise TypeError(f"model must be a vision-language model with get_image_features(), got "
                            f"{type(model).__name__}")
        self.image_token_id = _image_token_id(model)
        self.image_processor = image_processor
        self._image_token = image_token
        super().__init__(model, tokenizer, kind, **options)

    def _adapt(self, engine: Engine) -> Engine:
        """The text engine with the image token expanded in every row and the image features merged into
        ``inputs_embeds`` (:class:`Images`)."""
        image_token = self._image_token
        if image_token is None:
            image_token = engine.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if not isinstance(image_token, str) or engine.layout.encode(image_token) != [self.image_token_id]:
            raise ValueError(f"image_token={image_token!r} does not encode to the model's image token id "
                             f"{self.image_token_id} with the PRM tokenizer")
        self.image_token = image_token
        self._images = Images(engine.model, self.image_token_id, engine.layout.max_length)
        return dataclasses.replace(engine, layout=ImageLayout(engine.layout, self._images),
                                   embeds=self._images.embeds)

    @classmethod
    def from_pretrained(cls, path_or_id: str, kind: str = "lm_judge", *, image_processor=None, model_class=None,
                        trust_remote_code: bool = False, **options) -> "MultimodalP2TScorer":
        """Load a vision-language PRM, its tokenizer and its image processor (``image_processor``: an
        image processor or a path; default: the one saved with the model)."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        if image_processor is None or isinstance(image_processor, str):
            image_processor = AutoImageProcessor.from_pretrained(image_processor or path_or_id,
                                                                 trust_remote_code=trust_remote_code)
        return super().from_pretrained(path_or_id, kind, model_class=model_class or AutoModelForImageTextToText,
                                       trust_remote_code=trust_remote_code, image_processor=image_processor,
                                       **options)

    # ------------------------------------------------------------------ public
    def score(self, prompts, responses, *, images=None, **kw):
        """:meth:`P2TScorer.score` with ``images``: one image or ``None`` per prompt."""
        with self._with_images(prompts, images) as prompts:
            return super().score(prompts, responses, **kw)

    def score_ids(self, prompts, response_token_ids, *, images=None, **kw):
        """:meth:`P2TScorer.score_ids` with ``images``: one image or ``None`` per prompt."""
        with self._with_images(prompts, images) as prompts:
            return super().score_ids(prompts, response_token_ids, **kw)

    def rewards_ids(self, prompts, response_token_ids, *, images=None, **kw):
        """:meth:`P2TScorer.rewards_ids` with ``images``: one image or ``None`` per prompt."""
        with self._with_images(prompts, images) as prompts:
            return super().rewards_ids(prompts, response_token_ids, **kw)

    def advantages_ids(self, prompts, response_token_ids, outcome_rewards, *, images=None, **kw):
        """:meth:`P2TScorer.advantages_ids` with ``images``: one image or ``None`` per prompt. The fused path
        runs on the merged embeddings (the image positions are in no step: the op gives them nothing)."""
        with self._with_images(prompts, images) as prompts:
            return super().advantages_ids(prompts, response_token_ids, outcome_rewards, **kw)

    # ------------------------------------------------------------------ internals
    def _with_images(self, prompts, images):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
                raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
            imgs = [None] * len(prompts) if images is None else images
            if isinstance(imgs, (str, bytes)) or not isinstance(imgs, (list, tuple)):
                raise TypeError("images must be a list with one image (PIL image, tensor or file path) or None per "
                                f"prompt, got {type(images).__name__}")
            if len(imgs) != len(prompts):
                raise ValueError(f"images has {len(imgs)} entries but there are {len(prompts)} prompts")
            out = []
            for i, (p, im) in enumerate(zip(prompts, imgs)):
                if not isinstance(p, str):
                    raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
                n = p.count(self.image_token)
                if im is None and n:
                    raise ValueError(f"prompts[{i}] holds the image token {self.image_token!r} but no image was given")
                if im is not None and n > 1:
                    raise ValueError(f"prompts[{i}] holds the image token {n} times; one image per prompt")
                out.append(p if im is None or n == 1 else self.image_token + p)
            self._images.features = self._features(imgs)
            try:
                yield out
            finally:
                self._images.features = None
        return ctx()

    def _features(self, images: Sequence) -> list:
        """(image features [n, H] on the PRM's device, processor extras) per prompt; an image object or
        file given for several prompts (a GRPO group) is encoded once."""
        feats, seen = [], {}
        with torch.no_grad():
            for i, im in enumerate(images):
                if im is None:
                    feats.append(None)
                    continue
                key = os.fspath(im) if isinstance(im, (str, os.PathLike)) else id(im)
                if key not in seen:
                    if isinstance(im, (str, os.PathLike)):  # an image file (a dataset column)
                        from PIL import Image
                        with Image.open(im) as f:
                            im = f.convert("RGB")
                    elif not (isinstance(im, torch.Tensor) or hasattr(im, "convert")):
                        raise TypeError(f"images[{i}] must be a PIL image, a tensor, an image file path or None, "
                                        f"got {type(im).__name__}")
                    pix = self.image_processor(images=im, return_tensors="pt")
                    dtype = self.engine.embedding().weight.dtype
                    pix = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in pix.items()}
                    pix = {k: v.to(dtype) if k == "pixel_values" else v for k, v in pix.items()}
                    out = self.model.get_image_features(**pix)
                    pooled = getattr(out, "pooler_output", out)
                    f = pooled[0] if isinstance(pooled, (list, tuple)) else pooled
                    f = f.reshape(-1, f.shape[-1])
                    extras = {k: v for k, v in pix.items() if k != "pixel_values"}
                    seen[key] = (f.detach(), extras)
                feats.append(seen[key])
        return feats
