"""CLIP-based class proposal for open-vocabulary segmentation (method.md section 4).

DiGSeg answers one text query per denoising run, so with a large vocabulary (A-847) segmenting every class is
wasteful. A CLIP model first scores the image against the vocabulary ("A photo of a {class}."); a class is kept
when the image-text cosine exceeds ``global_threshold`` (0.25 in the paper), or when its best *patch token*
cosine exceeds ``patch_threshold``: small objects barely move the global embedding but dominate a few patches.

Patch tokens (the paper does not say how): the vision tower's last hidden states without the CLS token, through
the same ``post_layernorm`` and ``visual_projection`` as the CLS token, so patches live in the joint text space.
Without MaskCLIP-style surgery patch cosines are noisier, so ``patch_threshold`` defaults higher (0.3,
uncalibrated). The image is resized whole (no center crop), so classes near the borders keep their patches.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from .hub.files import hub_kwargs, resolve_file
from .image_processing import DiGSegImageProcessor, canonical_image
from .prompts import prompts_per_image
from .vocabularies import Vocabulary, load_vocabulary

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DiGSegClassProposer", "ProposalScores", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROPOSER_CONFIG_NAME = "proposer_config.json"

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


class SelectionOverrides(TypedDict, total=False):
    """Per-call replacements of a proposer's settings (see `DiGSegClassProposer.select`)."""

    global_threshold: float | None
    patch_threshold: float | None
    top_k: int | None


@dataclass
class ProposalScores:
    """Scores of one batch of images against one vocabulary.

    Attributes:
        class_names: the vocabulary, in its own order (columns of the score matrices).
        global_scores: ``[B, C]`` cosine between each image embedding and each class text embedding.
        patch_scores: ``[B, C]`` best patch-token cosine per class (``None`` when patch refinement is off).
        selected: per image, the indices of the proposed classes, best first.
    """

    class_names: list[str]
    global_scores: torch.Tensor
    patch_scores: torch.Tensor | None
    selected: list[list[int]]

    @property
    def proposals(self) -> list[list[str]]:
        return [[self.class_names[i] for i in indices] for indices in self.selected]


class DiGSegClassProposer(torch.nn.Module):
    """Proposes which vocabulary classes an image contains, with a CLIP model.

    Args:
        clip_model: a `transformers.CLIPModel` (the paper uses ViT-L/14).
        tokenizer: the CLIP tokenizer matching ``clip_model``.
        template: the prompt, or several prompts whose text embeddings are averaged; ``{}`` is the class name.
        global_threshold: keep a class when the image-text cosine exceeds this.
        patch_threshold: also keep it when its best patch-token cosine exceeds this; ``None`` disables patches.
        top_k: at most this many classes per image (best first); ``None`` for no cap.
        min_classes: at least this many classes per image (the best by global score), so that an image never gets
            an empty query list; 0 for pure thresholding.
        image_size: side of the square CLIP input; defaults to the vision config's. Other sizes interpolate the
            position embeddings (more patches for small objects).
        image_mean, image_std: normalisation of the CLIP model (OpenAI CLIP's by default).
        text_batch_size: class prompts encoded per text-tower call.

    Proposals are ordered by how far a class clears its threshold: ``max(global - global_threshold,
    patch - patch_threshold)``, so a small object rescued by its patches competes fairly with large ones.
    """

    def __init__(
        self,
        clip_model,
        tokenizer,
        template: str | Sequence[str] = "A photo of a {}.",
        global_threshold: float = 0.25,
        patch_threshold: float | None = 0.3,
        top_k: int | None = None,
        min_classes: int = 1,
        image_size: int | None = None,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        text_batch_size: int = 256,
    ):
        super().__init__()
        templates = [template] if isinstance(template, str) else list(template)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"template must contain '{{}}' where the class name goes; got {template!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None; got {top_k}")
        if min_classes < 0:
            raise ValueError(f"min_classes must be >= 0; got {min_classes}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB)")
        self.clip_model = clip_model.eval()
        self.tokenizer = tokenizer
        self.templates = templates
        self.global_threshold = float(global_threshold)
        self.patch_threshold = None if patch_threshold is None else float(patch_threshold)
        self.top_k = top_k
        self.min_classes = int(min_classes)
        self.image_size = int(image_size or clip_model.config.vision_config.image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.text_batch_size = int(text_batch_size)
        self._text_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.clip_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip_model.parameters()).dtype

    def proposer_config(self) -> dict:
        """The settings saved next to the CLIP weights."""
        return {
            "template": self.templates[0] if len(self.templates) == 1 else self.templates,
            "global_threshold": self.global_threshold,
            "patch_threshold": self.patch_threshold,
            "top_k": self.top_k,
            "min_classes": self.min_classes,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    # ------------------------------------------------------------------ raw CLIP towers (overridable in tests)
    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeddings ``[N, D]`` (not normalised). Uses the towers directly so that it works
        with transformers 4.x (tensor) and 5.x (model output) ``get_text_features`` alike."""
        inputs = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        outputs = self.clip_model.text_model(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
        )
        return self.clip_model.text_projection(outputs.pooler_output)

    def _embed_pixels(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected image embeddings ``[B, D]`` and patch-token embeddings ``[B, P, D]`` (not normalised)."""
        vision = self.clip_model.vision_model
        interpolate = self.image_size != self.clip_model.config.vision_config.image_size
        outputs = vision(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
        image_embeds = self.clip_model.visual_projection(outputs.pooler_output)
        patch_embeds = self.clip_model.visual_projection(vision.post_layernorm(outputs.last_hidden_state[:, 1:]))
        return image_embeds, patch_embeds

    # ------------------------------------------------------------------ encoders
    def clear_cache(self) -> None:
        """Forget cached vocabulary embeddings (needed only if the CLIP weights were changed in place)."""
        self._text_cache.clear()

    @torch.no_grad()
    def encode_vocabulary(self, class_names: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[C, D]`` of the class prompts, computed once per (names, templates)."""
        names = tuple(class_names)
        if not names:
            raise ValueError("the vocabulary is empty")
        key = (names, tuple(self.templates))
        cached = self._text_cache.get(key)
        if cached is None:
            per_template = []
            for template in self.templates:
                prompts = [template.format(name) for name in names]
                chunks = [
                    self._embed_texts(prompts[i : i + self.text_batch_size]).float()
                    for i in range(0, len(prompts), self.text_batch_size)
                ]
                per_template.append(F.normalize(torch.cat(chunks), dim=-1))
            cached = F.normalize(torch.stack(per_template).mean(0), dim=-1)
            self._text_cache[key] = cached
        return cached.to(self.device)

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images (PIL, numpy HWC/NHWC uint8/uint16/float in [0, 1], torch CHW/NCHW float in [0, 1], or a list)
        to normalised CLIP input ``[B, 3, S, S]``: the whole image resized (bicubic, antialiased), not cropped.

        The resize is the pipeline's (`DiGSegImageProcessor.resize_antialias`, in float32), not transformers'
        `CLIPImageProcessor`: without torchvision that one resizes through 8-bit PIL images, which moves the
        normalised values by up to 0.3 on textured images and drops the precision of 16-bit and float inputs."""
        # The pipeline's canonicaliser and range check: float pixels outside [0, 1] are refused, not clipped.
        images = images if isinstance(images, (list, tuple)) else [images]
        tensors = [t for i, image in enumerate(images) for t in canonical_image(image, f"images[{i}]").unbind(0)]
        if not tensors:
            raise ValueError("no images given")
        size = (self.image_size, self.image_size)
        resized = [
            DiGSegImageProcessor.resize_antialias(t[None].to(self.device, torch.float32), size, "bicubic", is_aa=True)
            for t in tensors
        ]
        pixels = torch.cat(resized).clamp(0.0, 1.0)
        mean = torch.tensor(self.image_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=self.device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm image embeddings ``[B, D]`` and patch-token embeddings ``[B, P, D]``."""
        image_embeds, patch_embeds = self._embed_pixels(self.preprocess(images))
        return F.normalize(image_embeds.float(), dim=-1), F.normalize(patch_embeds.float(), dim=-1)

    # ------------------------------------------------------------------ proposal
    @staticmethod
    def _class_names(vocabulary: Vocabulary | Sequence[str] | str) -> list[str]:
        names = vocabulary_class_names(vocabulary)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError("vocabulary must be a Vocabulary, a bundled vocabulary name, or a list of class names")
        return names

    def _settings(
        self, global_threshold: float | None = None, patch_threshold: float | None = None, top_k: int | None = None
    ) -> tuple[float, float | None, int | None]:
        """The call's ``(global_threshold, patch_threshold, top_k)``: each given value, else the configured one.
        An infinite ``patch_threshold`` turns patch refinement off (None)."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None; got {top_k}")
        global_threshold = self.global_threshold if global_threshold is None else float(global_threshold)
        patch_threshold = self.patch_threshold if patch_threshold is None else float(patch_threshold)
        if patch_threshold is not None and math.isinf(patch_threshold):
            patch_threshold = None
        return global_threshold, patch_threshold, self.top_k if top_k is None else int(top_k)

    def select(
        self,
        global_scores: torch.Tensor,
        patch_scores: torch.Tensor | None,
        **overrides: Unpack[SelectionOverrides],
    ) -> list[list[int]]:
        """Apply thresholds, ordering, ``top_k`` and ``min_classes`` to score matrices ``[B, C]``.

        ``global_threshold``, ``patch_threshold`` and ``top_k`` override the configured values for this call only
        (None: the configured value; ``patch_threshold=math.inf``: no patch refinement), so one proposer can be
        shared by callers with different settings without changing it.
        """
        global_threshold, patch_threshold, top_k = self._settings(**overrides)
        margin = global_scores - global_threshold
        if patch_scores is not None and patch_threshold is not None:
            margin = torch.maximum(margin, patch_scores - patch_threshold)
        selected = []
        for row_margin, row_global in zip(margin, global_scores):
            order = torch.argsort(row_margin, descending=True, stable=True)
            kept = [int(i) for i in order if row_margin[i] > 0]
            if top_k is not None:
                kept = kept[:top_k]
            if len(kept) < self.min_classes:
                for i in torch.argsort(row_global, descending=True, stable=True).tolist():
                    if len(kept) >= min(self.min_classes, row_global.numel()):
                        break
                    if i not in kept:
                        kept.append(i)
            selected.append(kept)
        return selected

    @torch.no_grad()
    def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        vocabulary: Vocabulary | Sequence[str] | str,
        **overrides: Unpack[SelectionOverrides],
    ) -> ProposalScores:
        """Global and patch scores of every class for every image, and the selection `propose` returns (the
        thresholds and ``top_k`` override the configured ones for this call, as in `select`)."""
        use_patches = self._settings(**overrides)[1] is not None  # also validates the overrides before any work
        names = self._class_names(vocabulary)
        text = self.encode_vocabulary(names)
        image_embeds, patch_embeds = self.encode_images(images)
        global_scores = (image_embeds @ text.T).cpu()
        patch_scores = None
        if use_patches:
            patch_scores = torch.einsum("bpd,cd->bpc", patch_embeds, text).amax(dim=1).cpu()
        return ProposalScores(names, global_scores, patch_scores, self.select(global_scores, patch_scores, **overrides))

    def propose(
        self,
        images: ImageInput | Sequence[ImageInput],
        vocabulary: Vocabulary | Sequence[str] | str,
        **overrides: Unpack[SelectionOverrides],
    ) -> list[list[str]]:
        """The proposed class names, one list per image, best first (overrides as in `select`)."""
        return self.score(images, vocabulary, **overrides).proposals

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the CLIP model, its tokenizer and ``proposer_config.json`` into one folder."""
        os.makedirs(save_directory, exist_ok=True)
        self.clip_model.save_pretrained(save_directory, **kwargs)
        self.tokenizer.save_pretrained(save_directory)
        with open(os.path.join(save_directory, PROPOSER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.proposer_config(), f, indent=2)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> DiGSegClassProposer:
        """Load a saved proposer, or wrap any CLIP checkpoint (a folder or hub id such as
        ``openai/clip-vit-large-patch14``) with default settings when it has no ``proposer_config.json``.

        Keyword arguments named like constructor arguments override the saved settings; the rest (``dtype``,
        ``local_files_only``, ``cache_dir``, ...) go to ``CLIPModel.from_pretrained`` (the Hub look-up ones to the
        tokenizer and the settings file too, through `hub_files.resolve_file`).
        """
        from transformers import AutoTokenizer, CLIPModel

        path = str(pretrained_model_name_or_path)
        lookup = hub_kwargs(kwargs)
        config_file = resolve_file(path, PROPOSER_CONFIG_NAME, subfolder, what="the class proposer", **lookup)
        settings = {}
        if config_file is not None:  # else a plain CLIP checkpoint: default settings
            with open(config_file, encoding="utf-8") as f:
                settings = json.load(f)
        own_keys = set(inspect.signature(cls).parameters) - {"clip_model", "tokenizer"}
        settings.update({k: kwargs.pop(k) for k in list(kwargs) if k in own_keys})
        sub = {"subfolder": subfolder} if subfolder else {}
        clip_model = CLIPModel.from_pretrained(path, **sub, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **sub, **lookup)
        return cls(clip_model, tokenizer, **settings)


def vocabulary_class_names(vocabulary: Vocabulary | Sequence[str] | str) -> list:
    """The class names of a `Vocabulary`, of a bundled vocabulary (by name), or of a sequence (unchecked)."""
    if isinstance(vocabulary, Vocabulary):
        return list(vocabulary.class_names)
    if isinstance(vocabulary, str):
        return list(load_vocabulary(vocabulary).class_names)
    return list(vocabulary)


def candidate_prompts(pixels01: torch.Tensor, prompt, vocabulary, class_proposer=None) -> list[list[str]]:
    """Per-image prompts of a pipeline call: `prompt` as given, or the `vocabulary` classes (all of them, or
    those `class_proposer` picks for each image)."""
    num_images = pixels01.shape[0]
    if (prompt is None) == (vocabulary is None):
        raise ValueError(
            "Give either `prompt` (the phrases to segment) or `vocabulary` (class names, a bundled vocabulary "
            "name, or a `Vocabulary`, from which candidates are picked), "
            + ("not both." if prompt is not None else "one of them is required.")
        )
    if prompt is not None:
        return prompts_per_image(prompt, num_images)
    if not isinstance(vocabulary, (Vocabulary, str)) and not (isinstance(vocabulary, (list, tuple)) and vocabulary):
        raise ValueError(
            "`vocabulary` must be a non-empty list of class names, a bundled vocabulary name (e.g. "
            f"'ade20k-150') or a `Vocabulary`; got {vocabulary!r}."
        )
    names = vocabulary_class_names(vocabulary)
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError("`vocabulary` entries must be non-empty strings.")
    if class_proposer is None:
        return prompts_per_image(names, num_images)
    proposals = [list(p) for p in class_proposer.propose(pixels01, names)]
    if len(proposals) != num_images:
        raise ValueError(f"the class proposer returned {len(proposals)} proposal lists for {num_images} images.")
    empty = [i for i, p in enumerate(proposals) if not p]
    if empty:
        raise ValueError(
            f"the class proposer proposed no class for image(s) {empty}; lower its thresholds or set "
            "`min_classes >= 1` so that every image gets at least one candidate."
        )
    return prompts_per_image(proposals, num_images)
