"""`DiGSegPipeline`: text-prompted segmentation by denoising mask latents with a Stable Diffusion U-Net.

A sibling of diffusers' Marigold pipelines (same argument names where the meaning is the same). A call (method.md
section 4) encodes every image once (VAE, ``z_x``) and every distinct prompt once; each (image, prompt, ensemble
member) is a *row*, denoised from Gaussian noise in chunks of `batch_size` rows with the U-Net seeing
``[z_x, z_y,t]``; the ensemble latents of a pair are averaged and decoded into a probability map (``>
mask_threshold``: the mask; argmax over prompts: the label map). Noise is drawn for all rows before chunking, so
results do not depend on `batch_size`.
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import PreTrainedModel

from . import mask_codec
from .image_processing import (
    PROBABILITY_DTYPES,
    RESAMPLE_METHODS,
    DiGSegImageProcessor,
    convert_outputs,
    label_map_from_best,
    probability_values,
    processing_size,
    vae_scale_factor,
)
from .lora_loader import DiGSegLoraLoaderMixin
from .mask_decoder import DiGSegMaskDecoder  # imported so that from_pretrained can resolve a saved mask_decoder
from .pipeline_hub import DiGSegPipelineHubMixin
from .prompt_cache import PromptEncodingMixin
from .prompts import check_training_vocabulary
from .proposal import candidate_prompts
from .scheduling import check_initial_noise, check_scheduler, next_latents, row_generators, step_accepts_generator
from .text_projection import DiGSegTextProjection

logger = logging.get_logger(__name__)


def _drop_empty_fp32_warning(record) -> bool:
    """diffusers (0.42) warns on every ``model.to(dtype)`` that modules "should be kept in float32: []" even when
    that list is empty, so ``pipe.to(torch.bfloat16)`` printed it once per component. Only that empty form is
    dropped; the warning with modules named still shows."""
    return "should be kept in float32: []." not in record.getMessage()


logging.get_logger("diffusers.models.modeling_utils").addFilter(_drop_empty_fp32_warning)


OUTPUT_TYPES = ("np", "pt", "pil")

EXAMPLE_DOC_STRING = """
        Examples:
            ```py
            >>> import torch
            >>> from digseg_diffusers import DiGSegPipeline
            >>> from digseg_diffusers.data.synthetic import generate_scene

            >>> pipe = DiGSegPipeline.from_pretrained("digseg-demo")  # the embedded demo model; or a folder / Hub id
            >>> image = generate_scene(20_000_000).image  # a held-out synthetic scene; any PIL image, array or tensor
            >>> out = pipe(image, prompt=["circle", "star"], generator=torch.Generator().manual_seed(0))
            >>> out.probabilities[0].shape  # [K, H, W], one map per prompt, values in [0, 1]
            (2, 64, 64)
            >>> out.masks[0].shape  # binary masks: probability > mask_threshold
            (2, 64, 64)
            >>> out.label_maps[0].shape  # 0 = background, k + 1 = prompt k
            (64, 64)

            ```
"""


@dataclass
class DiGSegOutput(BaseOutput):
    """Output of `DiGSegPipeline`; every list has one entry per input image, in input order.

    Args:
        probabilities: per image, ``[K, H, W]`` maps in [0, 1], one per prompt (arrays, tensors, or K "L"-mode
            images for "pil"; float32 unless `probability_dtype` says otherwise), or None.
        masks: per image, the binary masks ``[K, H, W]`` (`probabilities > mask_threshold`; "L" images with 0/255
            for "pil"), or None.
        label_maps: per image, ``[H, W]`` int64 labels: `BACKGROUND_LABEL` (0) where the best prompt scores below
            `background_threshold`, else 1 + the index of the best prompt ("P"-mode palette image for "pil").
        prompts: per image, the prompts in the order of the K maps.
        uncertainty: per image, ``[K, H, W]`` standard deviation of the ensemble members' probabilities, or None.
        latents: ``[R, 4, h, w]`` final latents of every row (image-major, then prompt, then member), or None.
    """

    probabilities: list | None
    masks: list | None
    label_maps: list
    prompts: list[list[str]]
    uncertainty: list | None = None
    latents: torch.Tensor | None = None

    def to_segments(self, index: int = 0, mask_format: str = "pil") -> list[dict]:
        """Image `index`'s results as transformers' image-segmentation pipeline lists them.

        One ``{"label": prompt, "score": float, "mask": PIL "L" image (0 / 255)}`` per prompt whose mask is not
        empty (as transformers leaves out labels that do not occur), in prompt order. ``mask`` is the prompt's own
        binary mask (masks may overlap, unlike label-map regions); ``score`` the mean probability inside it.
        Needs the call's `output_masks` and `output_probabilities`; ``mask_format="np"`` gives bool arrays.
        """
        if mask_format not in ("pil", "np"):
            raise ValueError(f"`mask_format` must be 'pil' or 'np'; got {mask_format!r}.")
        if self.masks is None or self.probabilities is None:
            raise ValueError("to_segments needs the masks and probabilities: call with output_masks=True and output_probabilities=True.")
        segments = []
        for prompt, mask, probability in zip(self.prompts[index], self.masks[index], self.probabilities[index]):
            mask = np.asarray(mask.cpu() if torch.is_tensor(mask) else mask).astype(bool)
            if not mask.any():
                continue
            probability = np.asarray(probability.cpu().numpy() if torch.is_tensor(probability) else probability)
            scale = 255.0 if probability.dtype == np.uint8 else 1.0  # "uint8" maps and "pil" images hold round(255 p)
            score = float(probability[mask].astype(np.float64).mean() / scale)
            if mask_format == "pil":
                mask = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
            segments.append({"label": prompt, "score": score, "mask": mask})
        return segments


class DiGSegPipeline(DiGSegPipelineHubMixin, DiffusionPipeline, DiGSegLoraLoaderMixin, PromptEncodingMixin):
    """Text-prompted segmentation with a Stable Diffusion U-Net fine-tuned to generate mask latents (DiGSeg).

    Args:
        unet: a `UNet2DConditionModel` with ``2 x latent_channels`` inputs (``[z_x, z_y,t]``).
        vae: `AutoencoderKL` or `AutoencoderTiny`, frozen; encodes images and decodes mask latents.
        scheduler: `DDIMScheduler` (trailing timestep spacing recommended: 1 step already works), or another of
            `SUPPORTED_SCHEDULERS` (e.g. ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``).
        text_encoder: a transformers text model whose first output is the token states (CLIP text by default).
        tokenizer: the text encoder's tokenizer.
        text_projection: `DiGSegTextProjection` mapping text width to the U-Net's `cross_attention_dim`.
        default_denoising_steps: steps used when `num_inference_steps` is not given.
        default_processing_resolution: longest side the image is resized to when `processing_resolution` is not
            given (0 = native resolution).
        default_mask_threshold: tau for binary masks (0.7, the paper's fixed value).
        default_background_threshold: tau_bg for the label map; None means "same as the mask threshold".
        base_model: name or path of the text-to-image model this pipeline was built from (for model cards).
        mask_decoder: optional light `DiGSegMaskDecoder` trained on this VAE's mask latents, used by default when
            present (~600x fewer FLOPs than the SD VAE decoder).
        training_vocabulary: the class names of a closed-vocabulary model (the demo model's six shapes): other
            prompts run with a warning. None for open-vocabulary models.
    """

    model_cpu_offload_seq = "text_encoder->text_projection->unet->vae->mask_decoder"
    _optional_components = ["mask_decoder"]

    _callback_tensor_inputs = ["latents", "image_latents", "prompt_embeds"]

    class_proposer = None
    """Optional `DiGSegClassProposer` (see `set_class_proposer`): picks each image's classes in calls with
    `vocabulary=`. Not a registered diffusers component: it is optional, usually attached after loading, and
    outside the denoising computation, so `model_index.json` is the same with or without one. This class's
    `from_pretrained`, `save_pretrained` (``class_proposer/`` subfolder) and `to` carry it along."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | AutoencoderTiny,
        scheduler: DDIMScheduler,
        text_encoder: PreTrainedModel,
        tokenizer: Any,
        text_projection: DiGSegTextProjection,
        default_denoising_steps: int = 1,
        default_processing_resolution: int = 512,
        default_mask_threshold: float = 0.7,
        default_background_threshold: float | None = None,
        base_model: str | None = None,
        mask_decoder: DiGSegMaskDecoder | None = None,
        training_vocabulary: list[str] | None = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet,
            vae=vae,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_projection=text_projection,
            mask_decoder=mask_decoder,
        )
        self.register_to_config(
            default_denoising_steps=default_denoising_steps,
            default_processing_resolution=default_processing_resolution,
            default_mask_threshold=default_mask_threshold,
            default_background_threshold=default_background_threshold,
            base_model=base_model,
            training_vocabulary=check_training_vocabulary(training_vocabulary),
        )
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = DiGSegImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ----------------------------------------------------------------------------------------------------- Construction

    @classmethod
    def from_base_model(
        cls,
        base_model: str | os.PathLike,
        text_encoder: str | os.PathLike | PreTrainedModel | None = None,
        tokenizer: str | os.PathLike | Any | None = None,
        text_projection_hidden_features: int | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "DiGSegPipeline":
        """Build an *untrained* DiGSeg pipeline from a Stable-Diffusion-layout checkpoint (hub id or folder).

        `conv_in` is widened to ``[z_x, z_y]`` (`conversion.widen_conv_in`), a fresh `text_projection` maps the text
        width to `cross_attention_dim`, the scheduler becomes DDIM with trailing spacing (same betas and
        `prediction_type`).

        Args:
            base_model: hub id or folder with `unet/`, `vae/`, `scheduler/` (and `text_encoder/`, `tokenizer/`
                when `text_encoder` is None).
            text_encoder: None to use the base's own text encoder, or a hub id / folder / model instance (e.g. a
                CLIP ViT-L/14 as in the paper). A full `CLIPModel` checkpoint contributes its text tower.
            tokenizer: tokenizer instance or id; defaults to the one next to `text_encoder`.
            text_projection_hidden_features: hidden width of the text MLP (default: the larger of the two widths).
            torch_dtype: dtype to load the weights in.
            kwargs: passed to every `from_pretrained` (`cache_dir`, `revision`, `local_files_only`, `token`, ...).
        """
        from .conversion import components_from_base_model

        return cls(
            **components_from_base_model(
                base_model, text_encoder, tokenizer, text_projection_hidden_features, torch_dtype, **kwargs
            )
        )

    @property
    def _execution_device(self) -> torch.device:
        """`DiffusionPipeline._execution_device`, without its walk over every submodule (~3 ms per call with an
        SD2 U-Net on a CPU host) when nothing is offloaded. accelerate's and diffusers' offloading all hook each
        offloaded component's top-level module; without such a hook the answer is the components' device."""
        modules = [getattr(self, name, None) for name in _component_names(type(self))]
        modules = [m for m in modules if isinstance(m, torch.nn.Module)]
        if any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in modules):
            return super()._execution_device
        # `self.device` without its per-component submodule walk: the first non-CPU device, else the first one.
        devices = [next(itertools.chain(m.parameters(), m.buffers()), torch.empty(0)).device for m in modules]
        return next((d for d in devices if d.type not in ("cpu", "meta")), devices[0] if devices else torch.device("cpu"))

    def to(self, *args, **kwargs) -> "DiGSegPipeline":
        """`DiffusionPipeline.to`, and the class proposer (not a registered component) follows the same device."""
        before = self._text_path_placement()
        pipe = super().to(*args, **kwargs)
        if self._text_path_placement() != before:  # cached embeddings live on the old device / dtype
            self.clear_prompt_cache()  # (model offload re-arms itself with `to()` after every call: no move, kept)
        if isinstance(self.class_proposer, torch.nn.Module):
            device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
            if device is not None:
                self.class_proposer.to(device)
        return pipe

    def _text_path_placement(self) -> tuple:
        modules = (self.text_encoder, self.text_projection)
        firsts = [next(m.parameters(), None) if isinstance(m, torch.nn.Module) else None for m in modules]
        return tuple((t.device, t.dtype) if t is not None else None for t in firsts)

    def set_class_proposer(self, class_proposer) -> None:
        """Use `class_proposer` (e.g. a `DiGSegClassProposer`, anything with ``propose(images, names)``) to pick
        each image's candidate classes in calls with `vocabulary=`; None removes it (every class is a candidate).

        It is an attribute, not a diffusers component: `to()` and CPU offload do not move it.
        """
        if class_proposer is not None and not callable(getattr(class_proposer, "propose", None)):
            raise ValueError(
                f"`class_proposer` needs a `propose(images, class_names)` method; got {type(class_proposer).__name__}."
            )
        self.class_proposer = class_proposer

    # ----------------------------------------------------------------------------- Building blocks shared with training

    def encode_images(
        self, pixels: torch.Tensor, batch_size: int | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Encode ``[N, 3, H, W]`` pixels in [-1, 1] into image latents ``z_x``, in chunks of `batch_size`.

        `device`: where the VAE runs (default: the pipeline's execution device). Not `self.vae.device`: under
        `enable_model_cpu_offload` the VAE sits on the CPU until its hook moves it, and the inputs must already
        be on the execution device then.
        """
        device = device if device is not None else self._execution_device
        return _chunked(lambda chunk: mask_codec.encode_pixels(self.vae, chunk.to(device)), pixels, batch_size)

    def decode_latents(
        self, latents: torch.Tensor, batch_size: int | None = None, mask_decoder: str | None = None
    ) -> torch.Tensor:
        """Decode mask latents ``[Q, 4, h, w]`` into probabilities ``[Q, 1, H, W]``, in chunks of `batch_size`.

        `mask_decoder`: "light" (the `mask_decoder` component), "vae" (the VAE decoder), or None (light when present).
        """
        light = self._light_mask_decoder(mask_decoder)
        return _chunked(lambda chunk: mask_codec.decode_masks(self.vae, chunk, mask_decoder=light), latents, batch_size)

    def _light_mask_decoder(self, choice: str | None):
        """The light decoder module to use for `choice` ("light" / "vae" / None), or None for the VAE decoder."""
        light = getattr(self, "mask_decoder", None)
        if choice not in (None, "light", "vae"):
            raise ValueError(f"`mask_decoder` must be 'light', 'vae' or None; got {choice!r}.")
        if choice == "vae" or (choice is None and light is None):
            return None
        if light is None:
            raise ValueError("`mask_decoder='light'` needs a pipeline with a `mask_decoder` component; it has none.")
        if light.upsampling_factor != self.vae_scale_factor:
            raise ValueError(
                f"`mask_decoder` upsamples {light.upsampling_factor}x but the VAE's scale factor is "
                f"{self.vae_scale_factor}: it was trained for another VAE."
            )
        return light

    # --------------------------------------------------------------------------------------------------- Input handling

    def check_inputs(
        self,
        num_images: int,
        image_size: tuple[int, int],
        num_rows: int,
        num_inference_steps: int | None,
        ensemble_size: int,
        processing_resolution: int | None,
        resample_method_input: str,
        batch_size: int,
        mask_threshold: float,
        background_threshold: float,
        latents: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        output_uncertainty: bool,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        mask_decoder: str | None = None,
        probability_dtype: str = "float32",
    ) -> tuple[int, int]:
        """Validate the arguments; returns the latent size ``(h, w)``. Every error names its argument."""
        check_scheduler(self.scheduler)
        self._light_mask_decoder(mask_decoder)
        if not isinstance(probability_dtype, str) or probability_dtype not in PROBABILITY_DTYPES:
            raise ValueError(f"`probability_dtype` must be one of {tuple(PROBABILITY_DTYPES)}; got {probability_dtype!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable; got {type(callback_on_step_end).__name__}.")
        unknown = [n for n in callback_on_step_end_tensor_inputs or [] if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; choose from {self._callback_tensor_inputs}."
            )
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
            raise ValueError(f"`num_inference_steps` must be an integer; got {num_inference_steps!r}.")
        max_steps = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= max_steps:
            raise ValueError(f"`num_inference_steps` must be in [1, {max_steps}]; got {num_inference_steps}.")
        for name, value in (("ensemble_size", ensemble_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if output_uncertainty and ensemble_size < 2:
            raise ValueError("`output_uncertainty=True` needs `ensemble_size` of at least 2.")
        if not isinstance(processing_resolution, int) or processing_resolution < 0:
            raise ValueError(
                f"`processing_resolution` must be a non-negative integer (0 = native); got {processing_resolution!r}."
            )
        if processing_resolution % self.vae_scale_factor != 0:
            raise ValueError(
                f"`processing_resolution` must be a multiple of {self.vae_scale_factor}; got {processing_resolution}."
            )
        if resample_method_input not in RESAMPLE_METHODS:
            raise ValueError(f"`resample_method_input` must be one of {RESAMPLE_METHODS}; got {resample_method_input!r}.")
        for name, value in (("mask_threshold", mask_threshold), ("background_threshold", background_threshold)):
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1]; got {value!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")

        height, width = processing_size(image_size, processing_resolution)
        latent_size = (-(-height // self.vae_scale_factor), -(-width // self.vae_scale_factor))

        check_initial_noise(latents, generator, (num_rows, self.vae.config.latent_channels, *latent_size))
        return latent_size

    # -------------------------------------------------------------------------------------------------------- Inference

    def resolve_call_defaults(
        self,
        num_inference_steps: int | None = None,
        processing_resolution: int | None = None,
        mask_threshold: float | None = None,
        background_threshold: float | None = None,
    ) -> dict:
        """The settings a call with these arguments uses: each None replaced by this model's default.

        The one place that knows the defaults (the config's, and `background_threshold` falling back to the mask
        threshold), so that the CLI, the ComfyUI nodes and the evaluation report and use what `__call__` does,
        e.g. a model whose calibrated threshold is not 0.7.
        """
        config = self.config
        settings = {
            "num_inference_steps": (num_inference_steps, config.default_denoising_steps),
            "processing_resolution": (processing_resolution, config.default_processing_resolution),
            "mask_threshold": (mask_threshold, config.default_mask_threshold),
            "background_threshold": (background_threshold, config.default_background_threshold),
        }
        resolved = {name: default if value is None else value for name, (value, default) in settings.items()}
        if resolved["background_threshold"] is None:
            resolved["background_threshold"] = resolved["mask_threshold"]
        return resolved

    @property
    def num_timesteps(self) -> int:
        """Denoising steps per row of the current (or last) call; diffusers' step callbacks read it."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """diffusers' early stop: a step callback sets ``pipe._interrupt = True`` and the remaining steps of every
        row are skipped (rows not denoised yet are decoded from their noise, so their maps are meaningless)."""
        return getattr(self, "_interrupt", False)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PipelineImageInput,
        prompt: str | list[str] | list[list[str]] | None = None,
        num_inference_steps: int | None = None,
        ensemble_size: int = 1,
        processing_resolution: int | None = None,
        match_input_resolution: bool = True,
        resample_method_input: str = "bilinear",
        batch_size: int = 8,
        mask_threshold: float | None = None,
        background_threshold: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        output_uncertainty: bool = False,
        output_latent: bool = False,
        return_dict: bool = True,
        progress_callback: Callable[[int, int], None] | None = None,
        vocabulary: list[str] | str | Any | None = None,
        mask_decoder: str | None = None,
        output_probabilities: bool = True,
        output_masks: bool = True,
        probability_dtype: str = "float32",
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> DiGSegOutput | tuple:
        """Segment `image` once per prompt.

        Args:
            image: a PIL image, a numpy array (HWC / NHWC; uint8, uint16, or float in [0, 1]), a torch tensor
                (CHW / NCHW, float in [0, 1] or uint8), or a list of those, all of one size (any size and mode).
            prompt: a class name or phrase, a list of them (shared by every image), or one list per image.
            num_inference_steps: DDIM steps per query (default from the config: 1, enough with trailing spacing).
            ensemble_size: noise seeds per query; their final latents are averaged before decoding.
            processing_resolution: longest side the image is resized to before encoding; 0 = native size;
                default from the config (512).
            match_input_resolution: resize the outputs back to the input size (else: processing size).
            resample_method_input: interpolation for the input resize (and the output resize of probabilities).
            batch_size: rows (image x prompt x ensemble member) per U-Net call, and the VAE chunk size; bounds
                memory, never changes results.
            mask_threshold: tau for `masks` (default from the config: 0.7).
            background_threshold: tau_bg for `label_maps` (default: the config's, else `mask_threshold`).
            generator: one `torch.Generator`, or one per row (images x prompts x ensemble_size, image-major); it
                draws the initial noise and, for stochastic schedulers (DDPM, Euler ancestral, LCM, ...), their
                step noise.
            latents: initial noise ``[rows, 4, h, w]`` instead of `generator`.
            output_type: "np", "pt" or "pil".
            output_uncertainty: also return the ensemble's per-pixel standard deviation (needs
                `ensemble_size >= 2`; decodes every member, so it costs E x more decoding).
            output_latent: also return the final latents of every row.
            return_dict: return a `DiGSegOutput`; else the tuple of its fields that are not None (no holes).
            progress_callback: called as ``progress_callback(done, total)`` after every U-Net call; raise from
                it to cancel the run (ComfyUI does this for its interrupt button).
            callback_on_step_end: diffusers' step callback (a function ``(pipe, step_index, timestep,
                callback_kwargs) -> dict``, or a `PipelineCallback`), called after every step of every chunk of
                `batch_size` rows with that chunk's tensors; tensors in the returned dict replace them.
            callback_on_step_end_tensor_inputs: names from `_callback_tensor_inputs`: "latents" (the mask latents
                ``z_y``, default), "image_latents" (``z_x``), "prompt_embeds" (the rows' cross-attention states).
            vocabulary: instead of `prompt`: a list of class names, a bundled vocabulary name (``"ade20k-150"``)
                or a `Vocabulary`. With a `class_proposer` set, each image gets the classes it proposes (best
                first); without one, every class is a prompt of every image. `prompts` in the output tells which.
            mask_decoder: "light" (the pipeline's light `mask_decoder` component), "vae" (the full VAE decoder), or
                None: light when the pipeline has one.
            output_probabilities: return the ``[K, H, W]`` probability maps (else None); with many prompts on a
                large image they dominate memory (150 prompts, 12 MP: 7 GB in float32), the label map does not.
            output_masks: return the ``[K, H, W]`` binary masks (else `masks` is None).
            probability_dtype: "float32" (default), "float16", or "uint8" (``round(255 p)``: 4x less memory) for
                `probabilities` and `uncertainty`.

        Examples:

        Returns:
            `DiGSegOutput`, or with ``return_dict=False`` the tuple of its fields that are not None.
        """
        # 0-1. Defaults from the config; inputs, checked before any heavy work.
        defaults = self.resolve_call_defaults(num_inference_steps, processing_resolution, mask_threshold, background_threshold)
        num_inference_steps, processing_resolution = defaults["num_inference_steps"], defaults["processing_resolution"]
        mask_threshold, background_threshold = defaults["mask_threshold"], defaults["background_threshold"]
        pixels01 = self.image_processor.canonical_batch(image)  # [N,3,H,W] in [0,1]
        prompts_per_image = candidate_prompts(pixels01, prompt, vocabulary, self.class_proposer)
        num_rows = sum(len(p) for p in prompts_per_image) * ensemble_size
        latent_size = self.check_inputs(
            pixels01.shape[0], tuple(pixels01.shape[-2:]), num_rows, num_inference_steps, ensemble_size,
            processing_resolution, resample_method_input, batch_size, mask_threshold, background_threshold, latents,
            generator, output_type, output_uncertainty, callback_on_step_end, callback_on_step_end_tensor_inputs,
            mask_decoder, probability_dtype,
        )  # fmt: skip
        device = self._execution_device
        dtype = mask_codec.compute_dtype(self.unet)

        # 2. Image latents, once per image.
        # Resize in float32 (antialiased resizing has no half-precision CPU kernel); encoding casts for the VAE.
        pixels, padding, original_size = self.image_processor.preprocess(
            pixels01, processing_resolution, resample_method_input, device=device, dtype=torch.float32
        )
        image_latents = self.encode_images(pixels, batch_size, device=device).to(dtype)  # [N,4,h,w]
        if tuple(image_latents.shape[-2:]) != latent_size:  # a VAE whose stride is not what its config says
            raise ValueError(f"VAE produced latents of size {tuple(image_latents.shape[-2:])}, expected {latent_size}.")

        # 3. Prompt embeddings, once per distinct prompt.
        unique_prompts = list(dict.fromkeys(p for prompts in prompts_per_image for p in prompts))
        self._warn_unknown_prompts(unique_prompts)
        prompt_embeds = self.encode_prompts(unique_prompts).to(device=device, dtype=dtype)  # [P,L,D]

        # 4. Rows: (image, prompt, member), image-major. Noise for all rows is drawn before chunking.
        row_image, row_prompt = _row_indices(prompts_per_image, unique_prompts, ensemble_size, device)
        shape = (num_rows, self.vae.config.latent_channels, *latent_size)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            noise = latents.to(device=device, dtype=dtype)

        # 5. Denoise in chunks of `batch_size` rows.
        row_latents = self._denoise(
            image_latents, prompt_embeds, row_image, row_prompt, noise, num_inference_steps, batch_size, generator,
            progress_callback, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 6-8. Decode (ensemble averaged in latent space) and restore the input geometry.
        out_probs, out_masks, out_labels, out_unc = self._postprocess(
            row_latents, prompts_per_image, ensemble_size, batch_size, mask_decoder, padding, original_size,
            match_input_resolution, resample_method_input, mask_threshold, background_threshold, output_type,
            output_probabilities, output_masks, output_uncertainty, probability_dtype,
        )  # fmt: skip
        self.maybe_free_model_hooks()
        output = DiGSegOutput(
            probabilities=out_probs, masks=out_masks, label_maps=out_labels, prompts=prompts_per_image,
            uncertainty=out_unc, latents=row_latents if output_latent else None,
        )  # fmt: skip
        return output if return_dict else output.to_tuple()

    def _denoise(
        self,
        image_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        row_image: torch.Tensor,
        row_prompt: torch.Tensor,
        noise: torch.Tensor,
        num_inference_steps: int,
        batch_size: int,
        generator,
        progress_callback,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> torch.Tensor:
        """The final latents ``[R, 4, h, w]`` of every row (``image_latents[row_image]`` with
        ``prompt_embeds[row_prompt]``, starting from `noise`), denoised in chunks of `batch_size` rows.

        The scheduler restarts for every chunk (multistep schedulers keep state between steps). Stochastic
        schedulers get one generator per row, derived from `generator`, so their noise does not depend on
        `batch_size` either.
        """
        num_rows, device = noise.shape[0], noise.device
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        elif callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        step_generators = row_generators(generator, num_rows, device) if step_accepts_generator(self.scheduler) else None
        # DDIM's step does its arithmetic on the timestep (`alphas_cumprod[t]`, `prev_t >= 0`): with timesteps on
        # the host it reads them without waiting for the GPU; the U-Net gets a copy on the device (one transfer
        # per call, and no CPU input that would keep CUDA graphs from capturing a compiled U-Net).
        scheduler_device = torch.device("cpu") if isinstance(self.scheduler, DDIMScheduler) else device
        self.scheduler.set_timesteps(num_inference_steps, device=scheduler_device)
        timesteps = self.scheduler.timesteps
        unet_timesteps = timesteps.to(device)
        self._num_timesteps = len(timesteps)  # read by diffusers' `PipelineCallback`s (e.g. cut-off callbacks)
        self._interrupt = False
        num_chunks = -(-num_rows // batch_size)
        total_calls, calls_done = num_chunks * len(timesteps), 0
        final_latents = []
        with self.progress_bar(total=total_calls) as progress:
            for start in range(0, num_rows, batch_size):
                rows = slice(start, start + batch_size)
                image_latents_chunk = image_latents[row_image[rows]]
                prompt_embeds_chunk = prompt_embeds[row_prompt[rows]]
                self.scheduler.set_timesteps(num_inference_steps, device=scheduler_device)
                latents_chunk = noise[rows] * self.scheduler.init_noise_sigma
                step_kwargs = {} if step_generators is None else {"generator": step_generators[rows]}
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        break
                    model_input = torch.cat(
                        [image_latents_chunk, self.scheduler.scale_model_input(latents_chunk, t)], dim=1
                    )
                    model_output = self.unet(
                        model_input, unet_timesteps[i], encoder_hidden_states=prompt_embeds_chunk, return_dict=False
                    )[0]
                    step = self.scheduler.step(model_output, t, latents_chunk, **step_kwargs)
                    latents_chunk = next_latents(step, last=i == len(timesteps) - 1)
                    if callback_on_step_end is not None:
                        names = {"latents": latents_chunk, "image_latents": image_latents_chunk, "prompt_embeds": prompt_embeds_chunk}
                        callback_kwargs = {name: names[name] for name in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, unet_timesteps[i], callback_kwargs) or {}
                        latents_chunk = callback_outputs.get("latents", latents_chunk)
                        image_latents_chunk = callback_outputs.get("image_latents", image_latents_chunk)
                        prompt_embeds_chunk = callback_outputs.get("prompt_embeds", prompt_embeds_chunk)
                    calls_done += 1
                    progress.update()
                    if progress_callback is not None:
                        progress_callback(calls_done, total_calls)
                final_latents.append(latents_chunk)
        return torch.cat(final_latents, dim=0)

    def _postprocess(
        self,
        row_latents: torch.Tensor,
        prompts_per_image: list[list[str]],
        ensemble_size: int,
        batch_size: int,
        mask_decoder: str | None,
        padding: tuple[int, int],
        original_size: tuple[int, int],
        match_input_resolution: bool,
        resample_method_input: str,
        mask_threshold: float,
        background_threshold: float,
        output_type: str,
        output_probabilities: bool,
        output_masks: bool,
        output_uncertainty: bool,
        probability_dtype: str,
    ) -> tuple:
        """``(probabilities, masks, label_maps, uncertainty)`` in `output_type`, each None when not asked for."""
        # 6. Average the ensemble in latent space, then decode once per (image, prompt).
        member_latents = row_latents.reshape(-1, ensemble_size, *row_latents.shape[1:])  # [Q,E,4,h,w]
        probabilities = self.decode_latents(member_latents.mean(dim=1), batch_size, mask_decoder)  # [Q,1,PH',PW']
        uncertainty = None
        if output_uncertainty:
            members = self.decode_latents(row_latents, batch_size, mask_decoder)
            uncertainty = members.reshape(-1, ensemble_size, *members.shape[1:]).std(dim=1)

        # 7-8. Per image, back to the input geometry, prompt chunk by prompt chunk: the label map keeps a running
        # best score, so peak memory grows with `batch_size` x H x W, not with the number of prompts; full-size
        # masks and probability maps are only kept when asked for.
        def restore(maps: torch.Tensor) -> torch.Tensor:
            maps = self.image_processor.unpad_image(maps.float(), padding)
            if match_input_resolution and tuple(maps.shape[-2:]) != tuple(original_size):
                maps = F.interpolate(maps, size=tuple(original_size), mode=resample_method_input)
                return maps[:, 0].clamp_(0.0, 1.0)  # a fresh full-size tensor: clamp it in place, not a copy
            return maps[:, 0].clamp(0.0, 1.0)

        output_size = tuple(original_size) if match_input_resolution else (
            probabilities.shape[-2] - padding[0], probabilities.shape[-1] - padding[1]
        )  # fmt: skip
        probs_dtype = PROBABILITY_DTYPES[probability_dtype]
        out_probs, out_masks, out_labels, out_unc = [], [], [], []
        start = 0
        for prompts in prompts_per_image:
            count, best, best_index = len(prompts), None, None
            # Outputs are filled in place (never concatenated: that would hold every map twice).
            image_probs = torch.empty((count, *output_size), dtype=probs_dtype) if output_probabilities else None
            image_masks = torch.empty((count, *output_size), dtype=torch.bool) if output_masks else None
            image_unc = torch.empty((count, *output_size), dtype=probs_dtype) if uncertainty is not None else None
            for first in range(0, count, batch_size):
                rows = slice(start + first, start + min(first + batch_size, count))
                local = slice(first, min(first + batch_size, count))
                probs = restore(probabilities[rows])  # [k,H,W] float32
                chunk_best, chunk_index = probs.max(dim=0)
                chunk_index += first
                if best is None:
                    best, best_index = chunk_best, chunk_index
                else:  # strictly better only: ties keep the earlier prompt, as `max` over all prompts does
                    better = chunk_best > best
                    torch.where(better, chunk_best, best, out=best)
                    torch.where(better, chunk_index, best_index, out=best_index)
                if image_masks is not None:
                    image_masks[local] = probs > mask_threshold
                if image_probs is not None:
                    image_probs[local] = probability_values(probs, probs_dtype)
                if image_unc is not None:
                    image_unc[local] = probability_values(restore(uncertainty[rows]), probs_dtype)
                del probs
            out_labels.append(label_map_from_best(best, best_index, background_threshold))
            out_masks.append(image_masks)
            out_probs.append(image_probs)
            if image_unc is not None:
                out_unc.append(image_unc)
            start += count

        return (
            convert_outputs(out_probs, output_type, "probability") if output_probabilities else None,
            convert_outputs(out_masks, output_type, "mask") if output_masks else None,
            convert_outputs(out_labels, output_type, "label"),
            convert_outputs(out_unc, output_type, "probability") if uncertainty is not None else None,
        )

def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """``fn`` applied to ``inputs`` in chunks of ``batch_size`` rows (None: all at once), concatenated."""
    batch_size = batch_size or max(inputs.shape[0], 1)
    return torch.cat([fn(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)], dim=0)


def _row_indices(
    prompts_per_image: list[list[str]], unique_prompts: list[str], ensemble_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row (image, prompt, ensemble member; image-major): its image index and its prompt's index."""
    row_image, row_prompt = [], []
    for n, prompts in enumerate(prompts_per_image):
        for p in prompts:
            row_image += [n] * ensemble_size
            row_prompt += [unique_prompts.index(p)] * ensemble_size
    return torch.tensor(row_image, device=device), torch.tensor(row_prompt, device=device)


@functools.lru_cache(maxsize=None)
def _component_names(pipeline_class: type) -> tuple[str, ...]:
    """The pipeline's component names (`_get_signature_keys` inspects `__init__`: once per class, not per call)."""
    return tuple(pipeline_class._get_signature_keys(pipeline_class)[0])


