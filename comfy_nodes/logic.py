"""Everything the DiGSeg ComfyUI nodes compute, as plain functions over torch tensors.

Nothing here imports ComfyUI, so the tests (and CI, which has no ComfyUI) run the real node logic. ComfyUI's layouts:
IMAGE is float32 ``[B, H, W, C]`` in [0, 1], MASK float32 ``[N, H, W]`` in [0, 1]. Segment's mask batch is
image-major (image ``b``, prompt ``k`` of K at index ``b * K + k``); its label map is MASK-shaped but holds the
pipeline's integer labels (0 = background, k + 1 = prompt k), so it is not a [0, 1] mask: Pick Mask takes regions out.
"""

from __future__ import annotations

import glob
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
from digseg_diffusers.demo import default_model_path, demo_model_vocabulary
from digseg_diffusers.hub.files import hub_reachable, is_hub_unreachable, looks_like_hub_id
from digseg_diffusers.hub.layout import MODEL_INDEX_NAME
from digseg_diffusers.inference.visualization import overlay
from digseg_diffusers.prompts import parse_prompts
from digseg_diffusers.proposal import DiGSegClassProposer
from digseg_diffusers.vocabularies import list_vocabularies, load_vocabulary

logger = logging.getLogger(__name__)

DEMO_CHOICE = "(embedded demo model)"
NO_MODEL_CHOICE = "(no model found: put DiGSeg folders in models/digseg)"
NO_PROPOSER_CHOICE = "(no proposer found: put a saved DiGSegClassProposer in models/digseg)"
PROPOSER_CONFIG = "proposer_config.json"
CUSTOM_VOCABULARY = "custom"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)
PICK_KINDS = ("mask", "probability", "region")
OVERLAY_ALPHA = 0.5
# Segment's default text: classes the embedded demo model was trained on (see `demo_model_vocabulary`).
DEFAULT_PROMPTS = "circle, square, star"


def comfy_images_to_pipeline(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (or one ``[H, W, C]``) -> pipeline input float32 ``[B, 3, H, W]`` on the CPU.

    C may be 1 (grey) or 4 (alpha dropped). Upstream nodes may leave values a hair outside [0, 1], or NaN; the
    pipeline refuses those, so they are clamped (NaN -> 0).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images.unsqueeze(0)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"image must be a ComfyUI IMAGE tensor [B, H, W, C] with C in (1, 3, 4); got {got}.")
    pixels = images.detach().to(device="cpu", dtype=torch.float32)[..., :3]
    pixels = torch.nan_to_num(pixels.expand(*pixels.shape[:-1], 3), nan=0.0).clamp(0.0, 1.0)
    return pixels.permute(0, 3, 1, 2).contiguous()


@dataclass
class SegmentationResult:
    """What Segment produced, kept together so that Pick Mask can never pair masks with the wrong prompts.

    `masks` (0/1: probability > mask threshold) and `probabilities` are float32 ``[B, K, H, W]``, `label_maps` int64
    ``[B, H, W]`` (0 = background, k + 1 = prompt k), `prompts` the K prompts in mask order.
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
        return self.masks.flatten(0, 1)

    def label_map_mask(self) -> torch.Tensor:
        """The label maps as a MASK-shaped float32 tensor ``[B, H, W]`` of integer labels."""
        return self.label_maps.to(torch.float32)


def empty_result(num_images: int, height: int, width: int, prompts: list[str] | None = None) -> SegmentationResult:
    """All-zero masks and an all-background label map: Segment's result when there is nothing to segment."""
    prompts = list(prompts or [])
    zeros = torch.zeros(num_images, len(prompts), height, width)
    return SegmentationResult(zeros, zeros.clone(), torch.zeros(num_images, height, width, dtype=torch.int64), prompts)


def pipeline_output_to_result(
    output: Any, prompts: list[str], num_images: int, height: int, width: int
) -> SegmentationResult:
    """`DiGSegOutput` (output_type "pt" or "np") -> `SegmentationResult`, checking every shape on the way."""
    maps_shape = (len(prompts), height, width)

    def stack(items, name: str, per_image_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(items) != num_images:
            raise ValueError(f"The pipeline returned {len(items)} {name} for {num_images} images.")
        tensors = [torch.as_tensor(item) for item in items]
        for tensor in tensors:
            if tuple(tensor.shape) != per_image_shape:
                raise ValueError(
                    f"The pipeline returned {name} of shape {tuple(tensor.shape)}, expected {per_image_shape}."
                )
        return torch.stack(tensors).to(device="cpu", dtype=dtype)

    probabilities = stack(output.probabilities, "probability maps", maps_shape, torch.float32)
    masks = stack(output.masks, "masks", maps_shape, torch.float32)
    label_maps = stack(output.label_maps, "label maps", (height, width), torch.int64)
    return SegmentationResult(masks, probabilities, label_maps, list(prompts))


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
    """Run the pipeline on a ComfyUI IMAGE batch with K shared prompts: masks ``[B, K, H, W]`` at the input size.

    No image or no prompt gives empty masks and runs nothing. None or a negative number (0 too for
    `num_inference_steps`) means the model's default, resolved by the pipeline as for every other caller
    (`DiGSegPipeline.resolve_call_defaults`: a model's calibrated threshold need not be 0.7);
    `processing_resolution` 0 is the image's own size.
    """
    pixels = comfy_images_to_pipeline(images)
    num_images, _, height, width = pixels.shape
    prompts = list(prompts)
    if not prompts:
        logger.warning("DiGSeg Segment: no prompts given; returning empty masks and an all-background label map.")
    if num_images == 0 or not prompts:
        return empty_result(num_images, height, width, prompts)

    def model_default(value, smallest: int = 0):
        return None if value is None or value < smallest else value

    output = pipe(
        pixels,
        prompt=prompts,
        num_inference_steps=model_default(num_inference_steps, smallest=1),
        ensemble_size=ensemble_size,
        processing_resolution=model_default(processing_resolution),
        match_input_resolution=True,
        batch_size=batch_size,
        mask_threshold=model_default(mask_threshold),
        background_threshold=model_default(background_threshold),
        generator=torch.Generator(device="cpu").manual_seed(int(seed)),  # the same noise on every device
        output_type="pt",
        progress_callback=progress_callback,
    )
    return pipeline_output_to_result(output, prompts, num_images, height, width)


def overlay_batch(
    images: torch.Tensor, label_maps: torch.Tensor, num_classes: int, alpha: float = OVERLAY_ALPHA
) -> torch.Tensor:
    """Colour label maps ``[B, H, W]`` onto an IMAGE batch ``[B, H, W, C]`` -> IMAGE ``[B, H, W, 3]``."""
    pixels = comfy_images_to_pipeline(images).permute(0, 2, 3, 1).numpy()  # `overlay` rounds them to 8 bits
    if tuple(label_maps.shape) != pixels.shape[:3]:
        raise ValueError(f"label maps {tuple(label_maps.shape)} do not match images {pixels.shape[:3]} (B, H, W).")
    labels = label_maps.to(torch.int64).cpu().numpy()
    painted = [overlay(image, label, alpha=alpha, num_classes=num_classes) for image, label in zip(pixels, labels)]
    if not painted:
        return torch.zeros(pixels.shape)
    return torch.from_numpy(np.stack(painted)).to(torch.float32) / 255.0


def select_prompt_index(prompts: list[str], select: str | int) -> int | None:
    """Resolve a prompt name (exact, then case-insensitive) or an integer index (negative counts from the end).

    None for a name that is not among the prompts (a class that was not segmented, e.g. not proposed): Pick Mask
    gives an all-zero mask for it. An index out of range is a wiring error and raises.
    """
    if isinstance(select, bool) or not isinstance(select, (str, int)):
        raise ValueError(f"select must be a prompt name or an index; got {select!r}.")
    text = str(select).strip()
    if not text:
        raise ValueError("select is empty: give a prompt name or an index (0 = first prompt).")
    lowered = [prompt.lower() for prompt in prompts]
    if text in prompts:
        return prompts.index(text)
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if not re.fullmatch(r"[+-]?\d+", text):
        return None
    index = int(text)
    if not -len(prompts) <= index < len(prompts):
        raise ValueError(
            f"select index {index} is out of range for {len(prompts)} prompts ({', '.join(prompts) or 'none'})."
        )
    return index % len(prompts)


def pick_mask(result: SegmentationResult, select: str | int, kind: str = "mask") -> torch.Tensor:
    """One prompt's MASK ``[B, H, W]``: its "mask" (binary: probability > mask threshold; may overlap other
    prompts'), its "probability" map, or its label-map "region" (exclusive, background excluded)."""
    if kind not in PICK_KINDS:
        raise ValueError(f"kind must be one of {PICK_KINDS}; got {kind!r}.")
    index = select_prompt_index(result.prompts, select)
    if index is None:
        prompts = ", ".join(result.prompts) or "none"
        logger.warning("DiGSeg Pick Mask: %r is not among the prompts (%s); returning empty masks.", select, prompts)
        return torch.zeros(result.label_maps.shape)
    if kind == "region":
        return (result.label_maps == index + 1).to(torch.float32)
    return (result.masks if kind == "mask" else result.probabilities)[:, index].clone()


def demo_model_path() -> str | None:
    """The embedded demo model's folder, or None when this installation carries none."""
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


def list_model_folders(search_paths: list[str], max_depth: int = 2, marker: str = MODEL_INDEX_NAME) -> list[str]:
    """Names ("/"-separated, relative) of the folders holding `marker` under the search paths, up to `max_depth`
    levels deep (``models/digseg/org/name``); hidden folders and folders inside a model folder are not listed."""
    found: set[str] = set()
    for root in search_paths:
        models: list[str] = []
        for depth in range(1, max_depth + 1):
            for path in sorted(glob.glob(os.path.join(*["*"] * depth, marker), root_dir=root)):
                name = os.path.dirname(path).replace(os.sep, "/")
                if not any(name.startswith(f"{model}/") for model in models):
                    models.append(name)
        found.update(models)
    return sorted(found)


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
    model: str, hub_id_or_path: str, search_paths: list[str], marker: str = MODEL_INDEX_NAME
) -> tuple[str, str]:
    """Decide what to load: ``("local", folder)`` or ``("hub", repo_id)``.

    A non-empty `hub_id_or_path` wins over the drop-down: an existing folder is loaded as is, a name found under
    the digseg model folders too, anything shaped like ``owner/name`` is a Hugging Face Hub id. A drop-down name
    must be a folder holding `marker`.
    """
    override = (hub_id_or_path or "").strip()
    if override:
        folder = os.path.expanduser(override)
        if not os.path.isdir(folder):
            folder = _find_in(search_paths, override) or ""
        if os.path.isdir(folder):
            return "local", os.path.abspath(folder)
        if "/" in override and looks_like_hub_id(override):
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
    if precision == "auto":
        return auto_dtype
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    return DTYPES[precision]


def from_pretrained(model_class: Any, kind: str, location: str, torch_dtype: torch.dtype) -> Any:
    """`model_class.from_pretrained` (a pipeline or a class proposer) for a local folder or a Hub id, in
    `torch_dtype`, with one clear message naming the id when the Hub fails."""
    if kind == "local":
        return model_class.from_pretrained(location, local_files_only=True, dtype=torch_dtype)
    if kind != "hub":
        raise ValueError(f"kind must be 'local' or 'hub'; got {kind!r}.")
    # Without a route to the Hub, huggingface_hub retries every file with back-off: a cached CLIP checkpoint took
    # 190 s to load that way, 1 s from the cache alone. One probe decides (False in offline mode too).
    offline = not hub_reachable()
    try:
        return model_class.from_pretrained(location, local_files_only=offline, dtype=torch_dtype)
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
    """Load a `DiGSegPipeline` (local folder or Hub id) in `torch_dtype`, then the optional adapter."""
    pipe = from_pretrained(pipeline_class, kind, location, torch_dtype)
    if adapter_path:
        pipe.load_digseg_adapter(adapter_path)
        pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)  # ComfyUI's own progress bar reports instead
    return pipe


def _stamp(path: str | None) -> float | None:
    """Newest modification time of a model/adapter file or folder (and its top-level files): re-saved reloads."""
    if not path or not os.path.exists(path):
        return None
    try:
        children = os.scandir(path) if os.path.isdir(path) else []
        return max([os.path.getmtime(path)] + [entry.stat().st_mtime for entry in children])
    except OSError:
        return None


def cache_key(kind: str, location: str, torch_dtype: torch.dtype, adapter_path: str | None) -> tuple:
    """What identifies a loaded model: source, precision, adapter (and the files' modification times)."""
    local = kind == "local"
    return (
        kind,
        os.path.realpath(location) if local else location,
        str(torch_dtype),
        os.path.realpath(adapter_path) if adapter_path else "",
        _stamp(location if local else None),
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
        else:
            self._entries[key] = load()
            self._evict(keep=self.max_entries)
        return self._entries[key]

    def clear(self) -> None:
        self._evict(keep=0)

    def _evict(self, keep: int) -> None:
        """Drop the least recently used entries until `keep` are left."""
        while len(self._entries) > keep:
            _, evicted = self._entries.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(evicted)


@dataclass
class DiGSegModel:
    """A loaded model (`DiGSegPipeline` or class proposer) in `dtype`, with ComfyUI's `ModelPatcher` around its
    modules (None outside ComfyUI), through which ComfyUI's memory manager moves and offloads it."""

    pipeline: Any
    dtype: torch.dtype
    patcher: Any = None


def proposer_choices(search_paths: list[str]) -> list[str]:
    """The proposal node's drop-down: folders saved by `DiGSegClassProposer.save_pretrained`."""
    return list_model_folders(search_paths, marker=PROPOSER_CONFIG) or [NO_PROPOSER_CHOICE]


def vocabulary_choices() -> list[str]:
    """Bundled benchmark vocabularies, then "custom" (a typed class list)."""
    return list(list_vocabularies()) + [CUSTOM_VOCABULARY]


def resolve_vocabulary(vocabulary: str, custom_classes: str) -> tuple[list[str], list[str]]:
    """The class names to score, and the prompt each one becomes in Segment (its first synonym).

    A-847 names are WordNet synonym lists ("building, edifice"): CLIP scores the full string, but a comma would
    split it into several Segment prompts.
    """
    if vocabulary == CUSTOM_VOCABULARY:
        names = parse_prompts(custom_classes)
        if not names:
            raise ValueError(
                "vocabulary is 'custom' but custom_classes is empty: type class names (comma or newline separated)."
            )
        return names, list(names)
    bundled = load_vocabulary(vocabulary)
    return list(bundled.class_names), [synonyms[0] for synonyms in bundled.synonyms]


def propose_classes(
    proposer: DiGSegClassProposer,
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
