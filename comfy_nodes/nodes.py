"""DiGSeg nodes for ComfyUI (V3 schema, pinned to the versioned `comfy_api.v0_0_2`).

Only imported inside a running ComfyUI (from `comfy_entrypoint`). The computation lives in `logic.py`; this module
adds the node schemas, ComfyUI's model-folder registry, device/memory management, the progress bar and interrupts.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

try:  # the versioned API; `latest` only if a future ComfyUI drops v0_0_2
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:  # pragma: no cover - depends on the ComfyUI version
    from comfy_api.latest import ComfyExtension, io

from digseg_diffusers.image_processing import processing_size

from . import logic

logger = logging.getLogger(__name__)

MODEL_FOLDER = "digseg"
CATEGORY = "DiGSeg"

# models/digseg, plus whatever extra_model_paths.yaml lists under "digseg:" (ComfyUI adds those itself).
folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))

DiGSegModelType = io.Custom("DIGSEG_MODEL")
DiGSegSegmentationType = io.Custom("DIGSEG_SEGMENTATION")


def model_search_paths() -> list[str]:
    return folder_paths.get_folder_paths(MODEL_FOLDER)


def _auto_dtype(device: torch.device) -> torch.dtype:
    if model_management.should_use_fp16(device, prioritize_performance=False):
        return torch.float16
    if model_management.should_use_bf16(device, prioritize_performance=False):
        return torch.bfloat16
    return torch.float32


def _release(model: logic.DiGSegModel) -> None:
    """Called when a model leaves the loader cache: move its weights off the GPU and return the cached memory."""
    if model.patcher is not None:
        try:
            model.patcher.detach()
        except Exception as error:  # never let cleanup break a run
            logger.warning("DiGSeg: could not offload an evicted model: %s", error)
    model_management.soft_empty_cache()


_CACHE = logic.ModelCache(max_entries=2, on_evict=_release)


def _load_managed(
    key: tuple, load: Callable[[], Any], dtype: torch.dtype, load_device: torch.device, offload_device: torch.device
) -> logic.DiGSegModel:
    """The cached model for `key`, else `load()`'s, with its torch modules in a `ModelPatcher`: ComfyUI's memory
    manager then moves and offloads them like its own models (when another model needs the VRAM, on "Unload
    models" or POST /free)."""

    def load_patched() -> logic.DiGSegModel:
        model = load().to(offload_device)
        if isinstance(model, torch.nn.Module):  # the class proposer: its own `device` property is read-only
            modules = {"proposer": model}
        else:  # a pipeline: its torch components
            modules = {name: part for name, part in model.components.items() if isinstance(part, torch.nn.Module)}
        patcher = comfy.model_patcher.ModelPatcher(
            torch.nn.ModuleDict(modules), load_device=load_device, offload_device=offload_device
        )
        return logic.DiGSegModel(model, dtype, patcher)

    return _CACHE.get_or_load(key, load_patched)


def _estimate_memory(model: logic.DiGSegModel, image: torch.Tensor, rows: int, processing_resolution: int) -> int:
    """Bytes one U-Net/VAE chunk needs beyond the weights (ComfyUI's own SD-VAE decode estimate per latent pixel)."""
    if processing_resolution < 0:
        processing_resolution = model.pipeline.resolve_call_defaults()["processing_resolution"]
    height, width = processing_size((int(image.shape[1]), int(image.shape[2])), processing_resolution)
    latent_pixels = max(1, height // 8) * max(1, width // 8)
    return int(rows * latent_pixels * 2178 * 64 * model_management.dtype_size(model.dtype))


def _threshold_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    """A [-1, 1] slider: a negative threshold means the model's default, or off."""
    return io.Float.Input(name, default=default, min=-1.0, max=1.0, step=0.01, tooltip=tooltip)


def _optional_text_input(name: str, tooltip: str, multiline: bool = False) -> io.String.Input:
    return io.String.Input(name, default="", multiline=multiline, optional=True, tooltip=tooltip)


class DiGSegModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiGSegModelLoader",
            display_name="DiGSeg Model Loader",
            category=CATEGORY,
            description=(
                "Loads a DiGSeg segmentation model: a folder saved by DiGSegPipeline.save_pretrained in models/digseg "
                "(or a path from extra_model_paths.yaml), the embedded demo model, or a Hugging Face Hub id. "
                "Loaded models are cached and managed by ComfyUI's memory manager."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=logic.model_choices(model_search_paths()),
                    tooltip=(
                        "A folder under models/digseg with a model_index.json, or the embedded demo model. "
                        + logic.demo_vocabulary_note()
                    ).strip(),
                ),
                io.Combo.Input(
                    "precision",
                    options=list(logic.PRECISIONS),
                    default="auto",
                    tooltip="Weight dtype. auto: fp16 where the device supports it, else bf16, else fp32.",
                ),
                _optional_text_input(
                    "hub_id_or_path",
                    "Optional. A Hugging Face Hub id (owner/name, needs network) or a folder path; overrides 'model'.",
                ),
                _optional_text_input(
                    "adapter",
                    "Optional. A DiGSeg adapter folder (absolute, or relative to the model or models/digseg).",
                ),
            ],
            outputs=[DiGSegModelType.Output(display_name="digseg_model")],
        )

    @classmethod
    def execute(cls, model: str, precision: str, hub_id_or_path: str = "", adapter: str = "") -> io.NodeOutput:
        search_paths = model_search_paths()
        kind, location = logic.resolve_model_source(model, hub_id_or_path, search_paths)
        adapter_path = logic.resolve_adapter_path(adapter, search_paths, location if kind == "local" else None)
        load_device = model_management.get_torch_device()
        dtype = logic.torch_dtype_for(precision, _auto_dtype(load_device))

        def load() -> logic.DiGSegPipeline:
            logger.info("DiGSeg: loading %s (%s, %s)", location, dtype, adapter_path or "no adapter")
            return logic.load_pipeline(kind, location, dtype, adapter_path)

        key = logic.cache_key(kind, location, dtype, adapter_path)
        offload_device = model_management.unet_offload_device()
        return io.NodeOutput(_load_managed(key, load, dtype, load_device, offload_device))


class DiGSegSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiGSegSegment",
            display_name="DiGSeg Segment",
            category=CATEGORY,
            description=(
                "Segments every image of the batch once per prompt. masks: MASK [B*K, H, W], image-major "
                "(image b, prompt k at index b*K + k). label_map: [B, H, W] integer labels as floats "
                "(0 = background, k + 1 = prompt k). overlay: the label map coloured over the images. "
                "A prompt that matches nothing gives an all-zero mask. " + logic.demo_vocabulary_note()
            ).strip(),
            inputs=[
                DiGSegModelType.Input("digseg_model"),
                io.Image.Input("image"),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default=logic.DEFAULT_PROMPTS,
                    tooltip=(
                        "Class names or phrases, separated by commas or new lines; duplicates are dropped. "
                        + logic.demo_vocabulary_note()
                    ).strip(),
                ),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=100,
                    tooltip="DDIM steps per prompt (1 works with trailing spacing). 0 = the model's default.",
                ),
                io.Int.Input("ensemble_size", default=1, min=1, max=64, tooltip="Noise seeds averaged per prompt."),
                io.Int.Input(
                    "processing_resolution",
                    default=-1,
                    min=-1,
                    max=4096,
                    tooltip=(
                        "Longest image side during processing (a multiple of 8). "
                        "-1 = the model's default, 0 = the image's own size."
                    ),
                ),
                _threshold_input(
                    "mask_threshold",
                    -1.0,
                    "Probability above which a pixel is in the mask. -1 = the model's calibrated default.",
                ),
                _threshold_input(
                    "background_threshold",
                    -1.0,
                    "Label map: pixels whose best prompt scores below this are background. "
                    "-1 = the model's default (else the mask threshold).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=False,  # segmentation should be reproducible: no "randomize" widget
                    tooltip="Seed of the initial noise.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=8,
                    min=1,
                    max=256,
                    tooltip=(
                        "(image, prompt, seed) rows per U-Net/VAE call. "
                        "Lower it if memory runs out; results do not change."
                    ),
                ),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="[B*K, H, W], index b*K + k = image b, prompt k."),
                io.Mask.Output(
                    display_name="label_map", tooltip="[B, H, W] integer labels: 0 background, k+1 prompt k."
                ),
                io.Image.Output(display_name="overlay", tooltip="The label map coloured over the images."),
                DiGSegSegmentationType.Output(
                    display_name="segmentation",
                    tooltip="Everything above plus the prompt names, for DiGSeg Pick Mask.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        digseg_model: logic.DiGSegModel,
        image: torch.Tensor,
        prompts: str,
        steps: int,
        ensemble_size: int,
        processing_resolution: int,
        mask_threshold: float,
        background_threshold: float,
        seed: int,
        batch_size: int,
    ) -> io.NodeOutput:
        prompt_list = logic.parse_prompts(prompts)
        images = image if image.ndim == 4 else image[None]
        rows = images.shape[0] * len(prompt_list) * ensemble_size
        if rows > 0 and digseg_model.patcher is not None:
            memory = _estimate_memory(digseg_model, images, min(batch_size, rows), processing_resolution)
            model_management.load_models_gpu([digseg_model.patcher], memory_required=memory, force_full_load=True)
        progress = comfy.utils.ProgressBar(1)  # the pipeline reports the real total with every step

        def on_progress(done: int, total: int) -> None:
            model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        try:
            result = logic.segment(
                digseg_model.pipeline,
                image,
                prompt_list,
                num_inference_steps=steps,
                ensemble_size=ensemble_size,
                processing_resolution=processing_resolution,
                mask_threshold=mask_threshold,
                background_threshold=background_threshold,
                seed=seed,
                batch_size=batch_size,
                progress_callback=on_progress,
            )
        finally:
            model_management.soft_empty_cache()
        overlay = logic.overlay_batch(image, result.label_maps, num_classes=result.num_prompts)
        output_device = model_management.intermediate_device()
        return io.NodeOutput(
            result.mask_batch().to(output_device),
            result.label_map_mask().to(output_device),
            overlay.to(output_device),
            result,
        )


class DiGSegPickMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiGSegPickMask",
            display_name="DiGSeg Pick Mask",
            category=CATEGORY,
            description=(
                "One prompt's MASK [B, H, W] out of a DiGSeg segmentation, by prompt name or index. "
                "A name that was not segmented gives an all-zero mask."
            ),
            inputs=[
                DiGSegSegmentationType.Input("segmentation"),
                io.String.Input("select", default="0", tooltip="A prompt name, or its index (0 = first, -1 = last)."),
                io.Combo.Input(
                    "kind",
                    options=list(logic.PICK_KINDS),
                    default="mask",
                    tooltip=(
                        "mask: thresholded (may overlap other prompts); probability: soft map; "
                        "region: the label-map region (exclusive)."
                    ),
                ),
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, segmentation: logic.SegmentationResult, select: str, kind: str) -> io.NodeOutput:
        mask = logic.pick_mask(segmentation, select, kind)
        return io.NodeOutput(mask.to(model_management.intermediate_device()))


class DiGSegClassProposal(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiGSegClassProposal",
            display_name="DiGSeg Class Proposal",
            category=CATEGORY,
            description=(
                "Proposes which classes of a vocabulary an image contains (CLIP scores with 'A photo of a {class}.'), "
                "as a STRING of prompts, one per line, to chain into DiGSeg Segment. For a batch: the union over "
                "the images, image 0's proposals first."
            ),
            inputs=[
                io.Image.Input("image"),
                io.Combo.Input(
                    "proposer",
                    options=logic.proposer_choices(model_search_paths()),
                    tooltip="A folder under models/digseg saved by DiGSegClassProposer.save_pretrained.",
                ),
                io.Combo.Input(
                    "vocabulary",
                    options=logic.vocabulary_choices(),
                    default="ade20k-150",
                    tooltip="A bundled benchmark vocabulary, or 'custom' to use custom_classes.",
                ),
                _threshold_input("global_threshold", 0.25, "Keep a class when the image-text cosine exceeds this."),
                _threshold_input(
                    "patch_threshold",
                    0.3,
                    "Also keep it when its best patch-token cosine exceeds this (finds small objects). Negative = off.",
                ),
                io.Int.Input(
                    "top_k", default=0, min=0, max=1000, tooltip="At most this many classes per image; 0 = no cap."
                ),
                _optional_text_input(
                    "custom_classes",
                    "Class names (comma or newline separated), used when vocabulary is 'custom'.",
                    multiline=True,
                ),
                _optional_text_input(
                    "hub_id_or_path",
                    "Optional. A CLIP checkpoint folder or Hub id (e.g. openai/clip-vit-large-patch14); "
                    "overrides 'proposer'.",
                ),
            ],
            outputs=[io.String.Output(display_name="classes", tooltip="Proposed prompts, one per line.")],
        )

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        proposer: str,
        vocabulary: str,
        global_threshold: float,
        patch_threshold: float,
        top_k: int,
        custom_classes: str = "",
        hub_id_or_path: str = "",
    ) -> io.NodeOutput:
        class_names, prompt_names = logic.resolve_vocabulary(vocabulary, custom_classes)
        search_paths = model_search_paths()
        kind, location = logic.resolve_model_source(proposer, hub_id_or_path, search_paths, logic.PROPOSER_CONFIG)
        load_device = model_management.text_encoder_device()
        dtype = _auto_dtype(load_device)

        def load() -> logic.DiGSegClassProposer:
            logger.info("DiGSeg: loading the class proposer %s (%s)", location, dtype)
            return logic.from_pretrained(logic.DiGSegClassProposer, kind, location, dtype)

        key = ("proposer",) + logic.cache_key(kind, location, dtype, None)
        loaded = _load_managed(key, load, dtype, load_device, model_management.text_encoder_offload_device())
        model_management.load_models_gpu([loaded.patcher], force_full_load=True)
        model_management.throw_exception_if_processing_interrupted()
        try:
            classes = logic.propose_classes(
                loaded.pipeline,
                image,
                class_names,
                prompt_names,
                global_threshold=global_threshold,
                patch_threshold=patch_threshold,
                top_k=top_k,
            )
        finally:
            model_management.soft_empty_cache()
        logger.info("DiGSeg: proposed %d classes: %s", len(classes), ", ".join(classes))
        return io.NodeOutput("\n".join(classes))


NODES: list[type[io.ComfyNode]] = [DiGSegModelLoader, DiGSegSegment, DiGSegPickMask, DiGSegClassProposal]


class DiGSegExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
