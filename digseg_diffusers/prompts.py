"""Prompt lists: one rule for splitting text into prompts, and what a model was trained to recognise.

Light on purpose (no torch import): the CLI checks its prompts with it before the heavy imports, and the ComfyUI
nodes split their text fields with the same rule, so ``"cat, dog"`` means two prompts everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

PROMPT_SEPARATORS = re.compile(r"[,\n\r]+")
"""Commas and line breaks separate prompts; a prompt itself never contains either."""


def parse_prompts(text: str | None) -> list[str]:
    """Comma- and/or newline-separated prompts -> a clean list (stripped, empties and duplicates dropped, order kept).
    Two identical prompts would give two identical masks and split the label map's argmax between them."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise ValueError(f"prompts must be a string; got {type(text).__name__}.")
    parts = (part.strip() for part in PROMPT_SEPARATORS.split(text))
    return list(dict.fromkeys(part for part in parts if part))


def normalize_prompt(prompt: str) -> str:
    """The form prompts are compared in: lower case, single spaces (as CLIP's tokenizer sees them)."""
    return " ".join(prompt.lower().split())


def prompts_outside_vocabulary(prompts: Iterable[str], vocabulary: Sequence[str] | None) -> list[str]:
    """The prompts (in order, once each) that are not names of `vocabulary`; none when it is None (open vocabulary).
    A vocabulary entry may list synonyms separated by commas ("tv, television"); each of them counts."""
    if vocabulary is None:
        return []
    known = {normalize_prompt(name) for entry in vocabulary for name in entry.split(",") if name.strip()}
    return list(dict.fromkeys(p for p in prompts if normalize_prompt(p) not in known))


def prompts_per_image(prompt: str | list[str] | list[list[str]] | None, num_images: int) -> list[list[str]]:
    """`prompt` as one list of prompts per image, checked: a string or a list is shared by every image."""
    if prompt is None:
        raise ValueError("`prompt` is required: a string, a list of strings, or one list of strings per image.")
    if isinstance(prompt, str):
        per_image = [[prompt]] * num_images
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
        if len(prompt) != num_images:
            raise ValueError(f"`prompt` has {len(prompt)} per-image lists but there are {num_images} images.")
        per_image = [list(p) for p in prompt]
    elif isinstance(prompt, (list, tuple)):
        per_image = [list(prompt)] * num_images
    else:
        raise ValueError(f"`prompt` must be a string or a list of strings; got {type(prompt).__name__}.")
    for i, prompts in enumerate(per_image):
        if not prompts:
            raise ValueError(f"`prompt` for image {i} is empty; give at least one prompt.")
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"`prompt` entries must be strings; got {type(p).__name__} ({p!r}).")
            if not p.strip():
                raise ValueError("`prompt` contains an empty string.")
    return per_image


def check_training_vocabulary(vocabulary) -> list[str] | None:
    """The pipeline config's `training_vocabulary`, checked: None (open vocabulary) or a list of class names."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, str) or not all(isinstance(name, str) and name.strip() for name in vocabulary):
        raise ValueError(f"`training_vocabulary` must be None or a list of class names; got {vocabulary!r}.")
    return list(vocabulary)
