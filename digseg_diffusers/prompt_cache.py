"""Prompt embeddings cached per pipeline: a prompt is encoded once while the text path stays unchanged.

Segmentation prompts repeat (a label set, a vocabulary such as ade20k-150), and encoding one costs ~2 ms on a CPU
host for the demo model, more for CLIP-H. `PromptEmbeddingCache` is a least-recently-used prompt -> ``[L, D]`` map.

A stale embedding would be a silent bug, so an entry is only valid for the *fingerprint* of the text path: the
identity of tokenizer, text encoder and text projection, the padded token length, and per parameter its
identity, dtype, device and version counter (bumped by every in-place write: ``copy_``, ``load_state_dict``,
optimizer steps). Not the storage address: accelerate's offload hooks re-place unchanged weights at every call.
Buffers (replaced by every move) count by name, shape, dtype and device; so do weights offloaded to "meta".
Inference tensors (ComfyUI loads models under ``torch.inference_mode()``) have no version counter: identity,
dtype and device must do. The pipeline also clears the cache when it changes adapters or moves the text path.
While the text path trains (train mode, a gradient, or grad mode with a parameter requiring grad) the cache is
bypassed. Writes it cannot see: through ``.data``, fused optimizers (``AdamW(fused=True)``), in-place writes into
inference tensors or into offloaded copies; call `clear` (``pipe.clear_prompt_cache()``) after those.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from diffusers.utils import logging

from .prompts import prompts_outside_vocabulary

logger = logging.get_logger(__name__)

DEFAULT_PROMPT_CACHE_SIZE = 256
"""Prompts kept per pipeline by default: a 150-class vocabulary fits; ~20 MB at SD2's 77 x 1024 in bf16."""


def text_path_fingerprint(tokenizer, text_encoder: torch.nn.Module, text_projection: torch.nn.Module,
                          max_length: int) -> tuple | None:
    """What the embedding of a prompt depends on, or None when the text path is training (bypass the cache)."""
    modules = (text_encoder, text_projection)
    if any(module.training for module in modules):
        return None
    wants_graph = torch.is_grad_enabled()
    tensors = []
    for index, module in enumerate(modules):
        for name, tensor in module.named_buffers():  # moving a module replaces its buffers: known by name
            tensors.append((index, name, tuple(tensor.shape), tensor.dtype, tensor.device))
        for name, tensor in module.named_parameters():
            if tensor.grad is not None or (wants_graph and tensor.requires_grad):
                return None
            if tensor.is_meta:  # offloaded: accelerate swaps in a new tensor at every forward; the name must do
                tensors.append((index, name, tuple(tensor.shape), tensor.dtype, "meta"))
                continue
            # Not the storage address: accelerate's offload hooks re-place unchanged weights at every call.
            # Inference tensors have no version counter (reading `_version` raises): their identity must do.
            version = None if tensor.is_inference() else tensor._version
            tensors.append((id(tensor), version, tensor.dtype, tensor.device))
    return (id(tokenizer), int(max_length), id(text_encoder), id(text_projection), tuple(tensors))


class PromptEmbeddingCache:
    """Least-recently-used prompt -> embedding map, valid for one text-path fingerprint (see the module docstring)."""

    def __init__(self, max_size: int = DEFAULT_PROMPT_CACHE_SIZE):
        self.max_size = _check_size(max_size)
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._fingerprint: tuple | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._fingerprint = None

    def resize(self, max_size: int) -> None:
        self.max_size = _check_size(max_size)
        self._evict()

    def info(self) -> dict:
        return {"size": len(self._entries), "max_size": self.max_size, "hits": self.hits, "misses": self.misses}

    def lookup(self, prompts: list[str], fingerprint: tuple | None,
               encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Embeddings ``[P, L, D]`` of `prompts` (a fresh tensor), encoding only the prompts not cached.

        `fingerprint` None (training) or a zero size: everything is encoded and nothing is kept.
        """
        if fingerprint is None or self.max_size == 0:
            return encode(prompts)
        if fingerprint != self._fingerprint:
            self._entries.clear()
            self._fingerprint = fingerprint
        missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        # One copy per row, so that evicting a prompt frees its memory (a view would keep the whole batch).
        found = {prompt: row.clone() for prompt, row in zip(missing, encode(missing))} if missing else {}
        rows = [found[prompt] if prompt in found else self._entries[prompt] for prompt in prompts]
        for prompt in prompts:
            if prompt not in found:
                self._entries.move_to_end(prompt)  # hits become the most recently used, then the new prompts
        self._entries.update(found)
        self._evict()
        return torch.stack(rows)  # a copy: callers may write into it without touching the cache

    def _evict(self) -> None:
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)


class PromptEncodingMixin:
    """How `DiGSegPipeline` turns prompts into cross-attention states: the frozen text encoder, the trainable
    projection, this module's cache in front of them, and what the model's training vocabulary says of them."""

    @property
    def text_max_length(self) -> int:
        """Token length every prompt is padded to; fixed so a prompt's embedding never depends on its neighbours."""
        length = getattr(self.tokenizer, "model_max_length", 77)
        return int(length) if length and length <= 4096 else 77

    def prompts_outside_vocabulary(self, prompts: list[str] | str, mark_reported: bool = False) -> list[str]:
        """The prompts this model was not trained on (empty for an open-vocabulary model; see `training_vocabulary`).

        The CLI, the ComfyUI nodes and `__call__`'s warning all ask here, so they agree on what the model knows.
        ``mark_reported=True``: the caller tells the user about them itself, so calls do not warn about them again.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        outside = prompts_outside_vocabulary(prompts, self.config.get("training_vocabulary"))
        if mark_reported:
            self.__dict__.setdefault("_warned_unknown_prompts", set()).update(outside)
        return outside

    def _warn_unknown_prompts(self, prompts: list[str]) -> None:
        """Warn once per prompt and pipeline: a closed-vocabulary model gives confident masks for anything."""
        warned = self.__dict__.setdefault("_warned_unknown_prompts", set())
        unknown = [p for p in self.prompts_outside_vocabulary(prompts) if p not in warned]
        if unknown:
            warned.update(unknown)
            known = ", ".join(self.config.training_vocabulary)
            logger.warning(
                f"Prompts outside this model's training vocabulary: {', '.join(map(repr, unknown))}. It was trained "
                f"on: {known}; masks for other prompts are not meaningful."
            )

    def encode_text_states(self, prompts: list[str]) -> torch.Tensor:
        """Token states ``[P, L, text_width]`` of the frozen text encoder (before the trainable projection)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.text_max_length,
            truncation=True,
            return_tensors="pt",
        )
        # The execution device, not the weights' device: with sequential CPU offload the weights sit on "meta"
        # until accelerate's hooks move them in.
        return self.text_encoder(tokens.input_ids.to(self._execution_device))[0]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Encode prompts into cross-attention states ``[P, L, cross_attention_dim]`` (text encoder + projection).

        Served from the pipeline's prompt cache where it can (see `prompt_cache`): a prompt is encoded once while
        the text encoder and projection are unchanged; never while they train.
        """
        prompts = list(prompts)
        fingerprint = None
        if self._prompt_embedding_cache().max_size:
            # None while the text path trains; frozen weights give an embedding without a graph in any grad mode.
            fingerprint = text_path_fingerprint(self.tokenizer, self.text_encoder, self.text_projection, self.text_max_length)
        return self._prompt_embedding_cache().lookup(prompts, fingerprint, self._encode_prompts_uncached)

    def _encode_prompts_uncached(self, prompts: list[str]) -> torch.Tensor:
        token_states = self.encode_text_states(prompts)
        dtype = next(self.text_projection.parameters()).dtype
        return self.text_projection(token_states.to(device=self._execution_device, dtype=dtype))

    def _prompt_embedding_cache(self) -> PromptEmbeddingCache:
        if "_prompt_cache" not in self.__dict__:
            self.__dict__["_prompt_cache"] = PromptEmbeddingCache()
        return self.__dict__["_prompt_cache"]

    def cache_prompt_embeddings(self, prompts: list[str] | str | Any) -> int:
        """Encode `prompts` now (a list, a bundled vocabulary name such as ``"ade20k-150"``, or a `Vocabulary`) so
        that later calls with any of them skip the text encoder; grows the cache to hold them all. Returns how
        many prompts the cache holds.

        Embeddings stay valid until the text encoder or projection changes (adapters, `to()`, weights written in
        place); then they are encoded again on first use.
        """
        from .proposal import vocabulary_class_names

        names = vocabulary_class_names(prompts)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError("`cache_prompt_embeddings` needs a non-empty list of non-empty prompt strings.")
        names = list(dict.fromkeys(names))
        cache = self._prompt_embedding_cache()
        if cache.max_size < len(names):
            cache.resize(len(names))
        with torch.no_grad():
            self.encode_prompts(names)
        return len(cache)

    def set_prompt_cache_size(self, max_size: int) -> None:
        """Keep at most `max_size` prompt embeddings (least recently used out first); 0 turns the cache off."""
        self._prompt_embedding_cache().resize(max_size)

    def clear_prompt_cache(self) -> None:
        """Forget every cached prompt embedding (needed only after writing text weights through ``.data``)."""
        self._prompt_embedding_cache().clear()

    def prompt_cache_info(self) -> dict:
        """``{"size", "max_size", "hits", "misses"}`` of the prompt-embedding cache."""
        return self._prompt_embedding_cache().info()


def _check_size(max_size) -> int:
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
        raise ValueError(f"the prompt cache size must be a non-negative integer (0 disables it); got {max_size!r}.")
    return max_size
