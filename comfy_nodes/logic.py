"""Everything the DiGSeg ComfyUI nodes compute, as plain functions over torch tensors.

Nothing here imports ComfyUI, so the tests (and CI, which has no ComfyUI) exercise the real node logic; `nodes.py`
only adds ComfyUI's schema, device management, progress bar and interrupt check around these functions.

Tensor conventions (ComfyUI's):
- IMAGE: float32 ``[B, H, W, C]`` in [0, 1] (C = 3; 1 or 4 are accepted, alpha is dropped).
- MASK: float32 ``[N, H, W]`` in [0, 1].
- The Segment node's mask batch is image-major: for image ``b`` and prompt ``k`` (K prompts), the mask is at index
  ``b * K + k``.
- The label map is a MASK-shaped float tensor ``[B, H, W]`` holding integer labels: 0 = background, k + 1 = prompt k
  (the pipeline's `label_maps`, unchanged). It is *not* a [0, 1] mask; pick one region with the Pick Mask node.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.demo import default_model_path
from digseg_diffusers.hub.files import hub_reachable, is_hub_unreachable
from digseg_diffusers.prompts import parse_prompts
from digseg_diffusers.proposal import DiGSegClassProposer
from digseg_diffusers.inference.visualization import overlay
from digseg_diffusers.vocabularies import list_vocabularies, load_vocabulary

logger = logging.getLogger(__name__)

DEMO_CHOICE = "(embedded demo model)"
NO_MODEL_CHOICE = "(no model found: put DiGSeg folders in models/digseg)"
NO_PROPOSER_CHOICE = "(no proposer found: put a saved DiGSegClassProposer in models/digseg)"
PROPOSER_CONFIG = "proposer_config.json"
CUSTOM_VOCABULARY = "custom"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PICK_KINDS = ("mask", "probability", "region")
OVERLAY_ALPHA = 0.5
MODEL_INDEX = "model_index.json"
DEFAULT_PROMPTS = "circle, square, star"
"""The Segment node's default text: classes the embedded demo model was trained on (see `demo_model_vocabulary`)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------------------------------------------
# Prompts and tensors
# ----------------------------------------------------------------------------------------------------------------


def comfy_images_to_pipeline(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` float in [0, 1] -> pipeline input ``[B, 3, H, W]`` float32 in [0, 1] (CPU)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"image must be a ComfyUI IMAGE tensor [B, H, W, C]; got {type(images).__name__}.")
    if images.ndim == 3:  # a single image without batch dimension
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image must be a ComfyUI IMAGE tensor [B, H, W, C] with C in (1, 3, 4); got {tuple(images.shape)}."
        )
    pixels = images.detach().to(device="cpu", dtype=torch.float32)
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(*pixels.shape[:-1], 3)
    pixels = pixels[..., :3]
    # Upstream nodes may leave values a hair outside [0, 1] (or NaN); the pipeline insists on [0, 1].
    pixels = torch.nan_to_num(pixels, nan=0.0).clamp(0.0, 1.0)
    return pixels.permute(0, 3, 1, 2).contiguous()


@dataclass
class SegmentationResult:
    """What the Segment node produced, kept together so Pick Mask can never pair masks with the wrong prompts.

    Attributes:
        masks: float32 ``[B, K, H, W]`` with 0/1 values (probability > mask threshold).
        probabilities: float32 ``[B, K, H, W]`` in [0, 1].
        label_maps: int64 ``[B, H, W]``: 0 = background, k + 1 = prompt k.
        prompts: the K prompts, in mask order.
    """

    masks: torch.Tensor
    probabilities: torch.Tensor
    label_maps: torch.Tensor
    prompts: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.label_maps.shape[0])

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def mask_batch(self) -> torch.Tensor:
        """ComfyUI MASK ``[B * K, H, W]``, image-major (index ``b * K + k``)."""
        b, k, h, w = self.masks.shape
        return self.masks.reshape(b * k, h, w)

    def label_map_mask(self) -> torch.Tensor:
        """The label maps as a MASK-shaped float32 tensor ``[B, H, W]`` of integer labels."""
        return self.label_maps.to(torch.float32)


def empty_result(num_images: int, height: int, width: int, prompts: list[str] | None = None) -> SegmentationResult:
    """All-zero masks/probabilities and an all-background label map (used when there is nothing to segment)."""
    prompts = list(prompts or [])
    k = len(prompts)
    return SegmentationResult(
        masks=torch.zeros(num_images, k, height, width),
        probabilities=torch.zeros(num_images, k, height, width),
        label_maps=torch.zeros(num_images, height, width, dtype=torch.int64),
        prompts=prompts,
    )


def pipeline_output_to_result(
    output: Any, prompts: list[str], num_images: int, height: int, width: int
) -> SegmentationResult:
    """`DiGSegOutput` (output_type "pt" or "np") -> `SegmentationResult`, checking every shape on the way."""
    k = len(prompts)

    def stack(items, name: str, per_image_shape: tuple[int, ...]) -> torch.Tensor:
        if len(items) != num_images:
            raise ValueError(f"The pipeline returned {len(items)} {name} for {num_images} images.")
        tensors = [torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item) for item in items]
        for tensor in tensors:
            if tuple(tensor.shape) != per_image_shape:
                raise ValueError(
                    f"The pipeline returned {name} of shape {tuple(tensor.shape)}, expected {per_image_shape}."
                )
        return torch.stack(tensors).cpu()

    probabilities = stack(output.probabilities, "probability maps", (k, height, width)).to(torch.float32)
    masks = stack(output.masks, "masks", (k, height, width)).to(torch.float32)
    label_maps = stack(output.label_maps, "label maps", (height, width)).to(torch.int64)
    return SegmentationResult(masks=masks, probabilities=probabilities, label_maps=label_maps, prompts=list(prompts))


def segment(
    pipe: Any,
    images: torch.Tensor,
    prompts: list[str],
    *,
    num_inference_steps: int | None = None,
    ensemble_size: int = 1,
    processing_resolution: int | None = None,
    mask_threshold: float | None = None,
    background_threshold: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress_callback: Callable[[int, int], None] | None = None,
) -> SegmentationResult:
    """Run the pipeline on a ComfyUI IMAGE batch with K shared prompts.

    B images and K prompts always give ``[B, K, H, W]`` masks at the input size, even when nothing is found
    (all-zero masks) or when there are no prompts at all (K = 0: nothing is run, the label map is all background).
    None (or a negative number; 0 for `num_inference_steps`) means the model's default, resolved by the pipeline
    exactly as for any other call (`DiGSegPipeline.resolve_call_defaults`): steps, `processing_resolution` (0: the
    image's own size), `mask_threshold` (a model's calibrated threshold need not be 0.7) and `background_threshold`
    (the model's, else the mask threshold).
    """
    pixels = comfy_images_to_pipeline(images)
    num_images, _, height, width = pixels.shape
    prompts = list(prompts)
    if num_images == 0 or not prompts:
        if not prompts:
            logger.warning("DiGSeg Segment: no prompts given; returning empty masks and an all-background label map.")
        return empty_result(num_images, height, width, prompts)

    def model_default_if_negative(value, zero_means_default: bool = False):
        return None if value is None or value < 0 or (zero_means_default and value == 0) else value

    num_inference_steps = model_default_if_negative(num_inference_steps, zero_means_default=True)
    processing_resolution = model_default_if_negative(processing_resolution)
    mask_threshold = model_default_if_negative(mask_threshold)
    background_threshold = model_default_if_negative(background_threshold)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))  # same noise on every device
    output = pipe(
        pixels,
        prompt=prompts,
        num_inference_steps=None if num_inference_steps is None else int(num_inference_steps),
        ensemble_size=int(ensemble_size),
        processing_resolution=None if processing_resolution is None else int(processing_resolution),
        match_input_resolution=True,
        batch_size=int(batch_size),
        mask_threshold=None if mask_threshold is None else float(mask_threshold),
        background_threshold=background_threshold,
        generator=generator,
        output_type="pt",
        progress_callback=progress_callback,
    )
    return pipeline_output_to_result(output, prompts, num_images, height, width)


def overlay_batch(
    images: torch.Tensor, label_maps: torch.Tensor, num_classes: int, alpha: float = OVERLAY_ALPHA
) -> torch.Tensor:
    """Colour label maps ``[B, H, W]`` onto an IMAGE batch ``[B, H, W, C]`` -> IMAGE ``[B, H, W, 3]``."""
    pixels = comfy_images_to_pipeline(images).permute(0, 2, 3, 1)  # [B,H,W,3] in [0,1]
    if label_maps.shape[0] != pixels.shape[0] or tuple(label_maps.shape[1:]) != tuple(pixels.shape[1:3]):
        raise ValueError(
            f"label maps {tuple(label_maps.shape)} do not match images {tuple(pixels.shape[:3])} (B, H, W)."
        )
    images_uint8 = (pixels * 255.0).round().to(torch.uint8).numpy()
    labels = label_maps.to(torch.int64).cpu().numpy()
    painted = [
        overlay(image, label, alpha=alpha, num_classes=num_classes) for image, label in zip(images_uint8, labels)
    ]
    if not painted:
        return torch.zeros(0, *pixels.shape[1:3], 3)
    return torch.from_numpy(np.stack(painted)).to(torch.float32) / 255.0


# ----------------------------------------------------------------------------------------------------------------
# Picking one prompt's mask
# ----------------------------------------------------------------------------------------------------------------


def select_prompt_index(prompts: list[str], select: str | int) -> int | None:
    """Resolve a prompt name (exact, then case-insensitive) or an integer index (negative counts from the end).

    Returns None for a name that is not among the prompts (a class that was not segmented, e.g. not proposed):
    the caller gives an all-zero mask for it. An index out of range is a wiring error and raises.
    """
    if isinstance(select, bool):
        raise ValueError(f"select must be a prompt name or an index; got {select!r}.")
    if isinstance(select, int):
        text = str(select)
    elif isinstance(select, str):
        text = select.strip()
    else:
        raise ValueError(f"select must be a prompt name or an index; got {type(select).__name__}.")
    if not text:
        raise ValueError("select is empty: give a prompt name or an index (0 = first prompt).")
    if text in prompts:
        return prompts.index(text)
    lowered = [p.lower() for p in prompts]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if not -len(prompts) <= index < len(prompts):
            raise ValueError(
                f"select index {index} is out of range for {len(prompts)} prompts ({', '.join(prompts) or 'none'})."
            )
        return index % len(prompts)
    return None


def pick_mask(result: SegmentationResult, select: str | int, kind: str = "mask") -> torch.Tensor:
    """One prompt's MASK ``[B, H, W]`` out of a segmentation result.

    kind: "mask" (binary, probability > mask threshold; masks of different prompts may overlap), "probability"
    (soft map in [0, 1]) or "region" (the prompt's label-map region: exclusive, background excluded).
    """
    if kind not in PICK_KINDS:
        raise ValueError(f"kind must be one of {PICK_KINDS}; got {kind!r}.")
    index = select_prompt_index(result.prompts, select)
    num_images, height, width = result.label_maps.shape
    if index is None:
        logger.warning(
            "DiGSeg Pick Mask: %r is not among the prompts (%s); returning empty masks.",
            select,
            ", ".join(result.prompts) or "none",
        )
        return torch.zeros(num_images, height, width)
    if kind == "mask":
        return result.masks[:, index].clone()
    if kind == "probability":
        return result.probabilities[:, index].clone()
    return (result.label_maps == index + 1).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Finding and loading models
# ----------------------------------------------------------------------------------------------------------------


def demo_model_path() -> str | None:
    """The embedded demo model's folder, or None when this installation carries none."""
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


def list_model_folders(search_paths: list[str], max_depth: int = 2, marker: str = MODEL_INDEX) -> list[str]:
    """Names (relative, "/"-separated) of the model folders (holding `marker`) under the search paths.

    Nested folders are found up to `max_depth` levels (``models/digseg/org/name``); a model folder is not searched
    further.
    """
    found: list[str] = []
    for root in search_paths:
        if not os.path.isdir(root):
            continue
        pending = [("", 0)]
        while pending:
            relative, depth = pending.pop()
            folder = os.path.join(root, relative) if relative else root
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if not entry.is_dir() or entry.name.startswith("."):
                    continue
                name = f"{relative}/{entry.name}" if relative else entry.name
                if os.path.isfile(os.path.join(entry.path, marker)):
                    found.append(name)
                elif depth + 1 < max_depth:
                    pending.append((name, depth + 1))
    return sorted(dict.fromkeys(found))


def demo_model_vocabulary() -> list[str] | None:
    """The class names the embedded demo model was trained on (its config's ``training_vocabulary``), or None.

    Read from the config alone (no weights), so the node schemas can tell users what the demo model segments.
    """
    folder = demo_model_path()
    if folder is None:
        return None
    return DiGSegPipeline.load_config(folder).get("training_vocabulary")


def demo_vocabulary_note() -> str:
    """One sentence for the node tooltips: what the embedded demo model segments (empty when none is embedded)."""
    vocabulary = demo_model_vocabulary()
    if not vocabulary:
        return ""
    return (
        f"The embedded demo model segments only: {', '.join(vocabulary)}; other prompts give meaningless masks "
        "(ComfyUI's log warns about them)."
    )


def model_choices(search_paths: list[str]) -> list[str]:
    """The loader's drop-down: the demo model (when embedded) first, then the local folders."""
    choices = ([DEMO_CHOICE] if demo_model_path() else []) + list_model_folders(search_paths)
    return choices or [NO_MODEL_CHOICE]


def _find_in(search_paths: list[str], name: str) -> str | None:
    for root in search_paths:
        candidate = os.path.join(root, *name.split("/"))
        if os.path.exists(candidate):
            return candidate
    return None


def resolve_model_source(
    model: str, hub_id_or_path: str, search_paths: list[str], marker: str = MODEL_INDEX
) -> tuple[str, str]:
    """Decide what to load: ``("local", folder)`` or ``("hub", repo_id)``.

    A non-empty `hub_id_or_path` wins over the drop-down: an existing folder is loaded as is, a name found under
    the digseg model folders too, anything shaped like ``owner/name`` is a Hugging Face Hub id. A drop-down name
    must be a folder holding `marker`.
    """
    override = (hub_id_or_path or "").strip()
    if override:
        expanded = os.path.expanduser(override)
        if os.path.isdir(expanded):
            return "local", os.path.abspath(expanded)
        found = _find_in(search_paths, override)
        if found is not None and os.path.isdir(found):
            return "local", os.path.abspath(found)
        if _HUB_ID.match(override):
            return "hub", override
        raise ValueError(
            f"hub_id_or_path {override!r} is neither an existing folder nor a Hugging Face Hub id (owner/name)."
        )
    if model == DEMO_CHOICE:
        try:
            return "local", default_model_path()
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
    if not model or model in (NO_MODEL_CHOICE, NO_PROPOSER_CHOICE):
        raise ValueError(
            f"No model selected: put a saved folder (with {marker}) into "
            f"{' or '.join(search_paths) or 'models/digseg'}, or type a Hub id / folder into hub_id_or_path."
        )
    found = _find_in(search_paths, model)
    if found is None or not os.path.isfile(os.path.join(found, marker)):
        raise ValueError(f"Model {model!r} was not found in {', '.join(search_paths)} (no {marker}).")
    return "local", os.path.abspath(found)


def resolve_adapter_path(adapter: str, search_paths: list[str], model_folder: str | None = None) -> str | None:
    """An adapter folder: absolute/user path, or relative to the model folder or the digseg model folders."""
    adapter = (adapter or "").strip()
    if not adapter:
        return None
    expanded = os.path.expanduser(adapter)
    if os.path.isabs(expanded):
        if os.path.exists(expanded):
            return expanded
        raise ValueError(f"adapter {adapter!r} does not exist.")
    roots = ([model_folder] if model_folder else []) + list(search_paths)
    found = _find_in(roots, adapter)
    if found is None:
        raise ValueError(f"adapter {adapter!r} was not found (looked in {', '.join(roots)}).")
    return os.path.abspath(found)


def torch_dtype_for(precision: str, auto_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """ "fp32" / "fp16" / "bf16" -> torch dtype; "auto" -> `auto_dtype` (the device's choice)."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return auto_dtype
    if precision not in table:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    return table[precision]


def _from_pretrained(model_class: Any, kind: str, location: str, **kwargs) -> Any:
    """`model_class.from_pretrained` for a local folder or a Hub id, with one clear message when the Hub fails."""
    if kind == "local":
        return model_class.from_pretrained(location, local_files_only=True, **kwargs)
    if kind != "hub":
        raise ValueError(f"kind must be 'local' or 'hub'; got {kind!r}.")
    # Without a route to the Hub, huggingface_hub retries every file with back-off: a cached CLIP checkpoint took
    # 190 s to load that way, 1 s from the cache alone. One probe decides (False in offline mode too).
    offline = not hub_reachable()
    try:
        return model_class.from_pretrained(location, local_files_only=offline, **kwargs)
    except Exception as error:
        if offline or is_hub_unreachable(error):
            raise RuntimeError(
                f"DiGSeg: could not download the model {location!r} from the Hugging Face Hub: this machine is "
                f"offline ({type(error).__name__}). Download it elsewhere and put the folder into the models/digseg "
                "folder (or point hub_id_or_path at it)."
            ) from error
        raise RuntimeError(
            f"DiGSeg: could not load the model {location!r} from the Hugging Face Hub: {error}"
        ) from error


def load_pipeline(
    kind: str,
    location: str,
    torch_dtype: torch.dtype,
    adapter_path: str | None = None,
    pipeline_class: type[DiGSegPipeline] = DiGSegPipeline,
) -> DiGSegPipeline:
    """Load a `DiGSegPipeline` (local folder or Hub id) in `torch_dtype`, then the optional adapter.

    Hub failures are turned into one clear message that names the id and says whether the machine looks offline.
    """
    pipe = _from_pretrained(pipeline_class, kind, location, dtype=torch_dtype)
    if adapter_path:
        pipe.load_digseg_adapter(adapter_path)
        pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)  # ComfyUI's own progress bar reports instead
    return pipe


def _stamp(path: str | None) -> float | None:
    """Modification time of a model/adapter folder's newest top-level file, so re-saved models are reloaded."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.path.getmtime(path)
    try:
        return max([os.path.getmtime(path)] + [e.stat().st_mtime for e in os.scandir(path)])
    except OSError:
        return None


def cache_key(kind: str, location: str, torch_dtype: torch.dtype, adapter_path: str | None) -> tuple:
    """What identifies a loaded model: source, precision, adapter (and the files' modification times)."""
    location_key = os.path.realpath(location) if kind == "local" else location
    adapter_key = os.path.realpath(adapter_path) if adapter_path else ""
    return (
        kind,
        location_key,
        str(torch_dtype),
        adapter_key,
        _stamp(location if kind == "local" else None),
        _stamp(adapter_path),
    )


class ModelCache:
    """A small LRU of loaded models, so switching a workflow back and forth does not reload from disk.

    `on_evict` is called with every value that leaves the cache (the ComfyUI layer releases its memory there).
    """

    def __init__(self, max_entries: int = 2, on_evict: Callable[[Any], None] | None = None):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1; got {max_entries}.")
        self.max_entries = max_entries
        self.on_evict = on_evict
        self._entries: OrderedDict[tuple, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get_or_load(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key in self._entries:
            self._entries.move_to_end(key)
            logger.debug("DiGSeg: reusing the cached model %r", key)
            return self._entries[key]
        value = load()
        self._entries[key] = value
        while len(self._entries) > self.max_entries:
            _, evicted = self._entries.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(evicted)
        return value

    def clear(self) -> None:
        while self._entries:
            _, evicted = self._entries.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(evicted)


@dataclass
class DiGSegModel:
    """The loader's output: a pipeline plus what ComfyUI needs to manage its memory.

    Attributes:
        pipeline: the `DiGSegPipeline`.
        dtype: the precision it was loaded in.
        source: a human-readable description ("local:/path" or "hub:owner/name").
        patcher: ComfyUI's `ModelPatcher` around the pipeline's modules (None outside ComfyUI).
    """

    pipeline: Any
    dtype: torch.dtype
    source: str
    patcher: Any = None


# ----------------------------------------------------------------------------------------------------------------
# Class proposal
# ----------------------------------------------------------------------------------------------------------------


def proposer_choices(search_paths: list[str]) -> list[str]:
    """The proposal node's drop-down: folders saved by `DiGSegClassProposer.save_pretrained`."""
    return list_model_folders(search_paths, marker=PROPOSER_CONFIG) or [NO_PROPOSER_CHOICE]


def vocabulary_choices() -> list[str]:
    """Bundled benchmark vocabularies, then "custom" (a typed class list)."""
    return list(list_vocabularies()) + [CUSTOM_VOCABULARY]


def resolve_vocabulary(vocabulary: str, custom_classes: str) -> tuple[list[str], list[str]]:
    """The class names to score, and the prompt each one becomes in Segment (its first synonym).

    A-847 names are WordNet synonym lists ("building, edifice"): CLIP scores the full string, but a comma would
    split it into several Segment prompts, so the proposed prompt is the first synonym.
    """
    if vocabulary == CUSTOM_VOCABULARY:
        names = parse_prompts(custom_classes)
        if not names:
            raise ValueError(
                "vocabulary is 'custom' but custom_classes is empty: type class names (comma or newline separated)."
            )
        return names, list(names)
    names = list(load_vocabulary(vocabulary).class_names)
    return names, [name.split(",")[0].strip() for name in names]


def load_proposer(
    kind: str, location: str, torch_dtype: torch.dtype, proposer_class: type[DiGSegClassProposer] = DiGSegClassProposer
) -> DiGSegClassProposer:
    """Load a `DiGSegClassProposer` (a saved folder, or any CLIP checkpoint folder / Hub id) in `torch_dtype`."""
    return _from_pretrained(proposer_class, kind, location, dtype=torch_dtype)


def propose_classes(
    proposer: Any,
    images: torch.Tensor,
    class_names: list[str],
    prompt_names: list[str] | None = None,
    *,
    global_threshold: float = 0.25,
    patch_threshold: float | None = 0.3,
    top_k: int | None = None,
) -> list[str]:
    """Proposed prompts for a ComfyUI IMAGE batch: the union over the images, best first within each image.

    Segment shares one prompt list across the batch (so that masks stay ``[B * K, H, W]``), hence the union; image
    0's proposals come first. `patch_threshold` None/negative disables patch refinement, `top_k` None/0 no cap.
    The settings are this call's only: the proposer is cached and shared by every node that uses it.
    """
    prompt_names = list(prompt_names) if prompt_names is not None else list(class_names)
    if len(prompt_names) != len(class_names):
        raise ValueError(f"prompt_names ({len(prompt_names)}) must match class_names ({len(class_names)}).")
    pixels = comfy_images_to_pipeline(images)
    if pixels.shape[0] == 0:
        return []
    scores = proposer.score(
        pixels,
        class_names,
        global_threshold=float(global_threshold),
        patch_threshold=math.inf if patch_threshold is None or patch_threshold < 0 else float(patch_threshold),
        # top_k 0: every class, no cap, whatever the proposer's own top_k
        top_k=int(top_k) if top_k else max(1, len(class_names)),
    )
    return list(dict.fromkeys(prompt_names[i] for indices in scores.selected for i in indices))
