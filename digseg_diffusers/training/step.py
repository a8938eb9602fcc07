"""The DiGSeg training step: timesteps, noise, target, and the weighted loss (latent, end-to-end, multi-prompt).

`training/train_adapter.py` is a thin loop around `compute_batch_loss`. The objectives (``LOSSES``):

- ``"latent"`` (method.md section 3): DiGSeg's timesteps and noise, the scheduler's target (epsilon or v), a
  squared error per latent pixel weighted by the share of valid image pixels under it.
- ``"e2e"`` (the end-to-end task loss of diffusion-e2e-ft, "Fine-Tuning Image-Conditional Diffusion Models is
  Easier than You Think"): every row at ``T - 1`` from Gaussian noise (where 1-step trailing inference starts);
  the x0 estimate is decoded, with gradients, by the VAE or the light `DiGSegMaskDecoder`, and scored with
  BCE + soft Dice on the valid pixels.
- ``"latent+e2e"``: both losses on one prediction at ``T - 1``.

``prompts_per_image = K > 1`` adds the argmax-aware multi-prompt loss: K consecutive rows query one image (its
present classes and sampled absent ones) at one timestep, and a per-pixel cross-entropy over the K decoded maps
plus background scores the decision inference makes.

Both decoded losses use decision logits, positive exactly where the pipeline's probability exceeds the mask
threshold tau: the light decoder's logits minus ``logit(tau)``, or for the VAE (probability ``(c + 1) / 2`` of the
clamped channel mean ``c``) ``VAE_LOGIT_SCALE * (c - (2 tau - 1))``, unclamped so that a pixel far out of range
still gets a gradient. Background is the constant logit 0: the argmax over ``[K maps, background]`` is the
pipeline's label map.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from digseg_diffusers import mask_codec
from digseg_diffusers.noise import (
    DEFAULT_NOISE_STRENGTH,
    DEFAULT_NOISE_VARIANT,
    check_timestep_bias,
    sample_training_noise,
    sample_training_timesteps,
)

LOSSES: tuple[str, ...] = ("latent", "e2e", "latent+e2e")
# Slope of the VAE decoder's decision logits per unit of decoded channel value (range [-1, 1]): the default
# threshold 0.7 sits at c = 0.4, so c = 1 gives logit 3 (p 0.95) and c = -1 gives -7.
VAE_LOGIT_SCALE = 5.0


@dataclass(frozen=True)
class TrainingLossConfig:
    """What one training step optimises (see the module docstring)."""

    loss: str = "latent"
    prompts_per_image: int = 1
    noise_variant: str = DEFAULT_NOISE_VARIANT
    noise_strength: float = DEFAULT_NOISE_STRENGTH
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    e2e_weight: float = 1.0
    multi_prompt_weight: float = 1.0
    mask_threshold: float = 0.7

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}.")
        if not isinstance(self.prompts_per_image, int) or self.prompts_per_image < 1:
            raise ValueError(f"`prompts_per_image` must be a positive integer, got {self.prompts_per_image!r}.")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"`mask_threshold` must be in (0, 1), got {self.mask_threshold!r}.")
        for name in ("e2e_weight", "multi_prompt_weight"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)!r}.")
        check_timestep_bias(self.timestep_bias_strategy, self.timestep_bias_multiplier, self.timestep_bias_portion)

    @property
    def uses_latent_loss(self) -> bool:
        return self.loss in ("latent", "latent+e2e")

    @property
    def uses_task_loss(self) -> bool:
        return self.loss in ("e2e", "latent+e2e")

    @property
    def needs_decoder(self) -> bool:
        """Whether the step decodes the x0 estimate (task loss or multi-prompt loss)."""
        return self.uses_task_loss or self.prompts_per_image > 1


@dataclass
class TrainingLoss:
    """The step's total loss (to backpropagate) and its detached parts, for the log."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def latent_loss_weights(valid: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Per-latent-pixel loss weight: the share of non-ignored image pixels under it (method.md: ignore excluded)."""
    return F.adaptive_avg_pool2d(valid, latent_size)


def weighted_latent_loss(model_pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Squared error per latent pixel, weighted by `latent_loss_weights`, averaged over weight and channels."""
    weights = latent_loss_weights(valid.float(), tuple(model_pred.shape[-2:]))
    squared_error = (model_pred.float() - target.float()) ** 2 * weights
    return squared_error.sum() / (weights.sum() * model_pred.shape[1]).clamp(min=1.0)


def predicted_original_sample(scheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The x0 estimate of a prediction at `timesteps` (what DDIM's ``pred_original_sample`` gives)."""
    prediction_type = scheduler.config.prediction_type
    alpha = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)[timesteps.to(sample.device).long()]
    alpha = alpha.view(-1, *([1] * (sample.dim() - 1)))
    output, sample = model_output.float(), sample.float()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * output
    if prediction_type == "epsilon":
        return (sample - (1 - alpha).sqrt() * output) / alpha.sqrt().clamp(min=1e-4)
    if prediction_type == "sample":
        return output
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}")


def _training_target(scheduler, mask_latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(mask_latents, noise, timesteps)
    if prediction_type == "sample":
        return mask_latents
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}")


def decision_logits(vae, latents: torch.Tensor, mask_threshold: float, mask_decoder=None) -> torch.Tensor:
    """Logits ``[B, 1, H, W]`` of decoded mask latents, positive exactly where the pipeline's mask is on.

    Differentiable in `latents` (and in the decoder's weights); see the module docstring for the two decoders.
    """
    if mask_decoder is not None:
        param = next(mask_decoder.parameters())
        logits = mask_decoder(latents.to(device=param.device, dtype=param.dtype)).float()
        return logits - torch.logit(torch.tensor(float(mask_threshold))).item()
    channels = mask_codec.decode_mask_channels(vae, latents).mean(dim=1, keepdim=True)
    return VAE_LOGIT_SCALE * (channels - (2.0 * mask_threshold - 1.0))


def mask_task_loss(logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice of decision logits ``[B, 1, H, W]`` against binary masks, on the valid pixels only.

    BCE is averaged over all valid pixels of the batch; Dice per row (an empty target scores 0 for an empty
    prediction thanks to `smooth`), then averaged.
    """
    valid = valid.float()
    masks = masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    bce = (bce * valid).sum() / valid.sum().clamp(min=1.0)
    probabilities = torch.sigmoid(logits) * valid
    targets = masks * valid
    intersection = (probabilities * targets).flatten(1).sum(1)
    total = probabilities.flatten(1).sum(1) + targets.flatten(1).sum(1)
    dice = 1.0 - (2.0 * intersection + smooth) / (total + smooth)
    return bce + dice.mean()


def multi_prompt_cross_entropy(logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, prompts_per_image: int) -> torch.Tensor:
    """Per-pixel cross-entropy over each image's K decision maps plus background (logit 0).

    `logits`, `masks`, `valid`: ``[G * K, 1, H, W]``, the K queries of each image in consecutive rows. The target
    of a pixel is the query whose mask covers it, or background when none does (classes never overlap).
    """
    rows = logits.shape[0]
    if rows % prompts_per_image:
        raise ValueError(f"{rows} rows do not split into groups of prompts_per_image={prompts_per_image}.")
    height, width = logits.shape[-2:]
    grouped = logits.float().reshape(-1, prompts_per_image, height, width)
    scores = torch.cat([grouped, grouped.new_zeros(grouped.shape[0], 1, height, width)], dim=1)  # [G, K + 1, H, W]
    grouped_masks = masks.reshape(-1, prompts_per_image, height, width) > 0.5
    covered = grouped_masks.any(dim=1)
    target = torch.where(covered, grouped_masks.float().argmax(dim=1), torch.full_like(covered, prompts_per_image, dtype=torch.long))
    pixel_valid = valid.reshape(-1, prompts_per_image, height, width)[:, 0].float()
    cross_entropy = F.cross_entropy(scores, target, reduction="none")
    return (cross_entropy * pixel_valid).sum() / pixel_valid.sum().clamp(min=1.0)


def compute_training_loss(
    unet,
    scheduler,
    image_latents: torch.Tensor,
    mask_latents: torch.Tensor,
    text_states: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    config: TrainingLossConfig,
    generator: torch.Generator | None = None,
    vae=None,
    mask_decoder=None,
) -> TrainingLoss:
    """One U-Net forward pass on ``cat([image_latents, z_t])`` and the configured loss.

    Latents are ``[R, C, h, w]`` (scaled, `mask_codec`), `text_states` ``[R, L, D]``, `masks` / `valid`
    ``[R, 1, H, W]`` in pixels. `scheduler` is a DDPM-like scheduler (``alphas_cumprod``, ``add_noise``,
    ``get_velocity``). `generator` draws the timesteps and noise (seeded per batch: a resume replays exactly);
    `vae` / `mask_decoder` decode for the task and multi-prompt losses (the light decoder when given).
    """
    rows = mask_latents.shape[0]
    group_size = config.prompts_per_image
    if rows % group_size:
        raise ValueError(f"a batch of {rows} rows does not split into groups of prompts_per_image={group_size}.")
    if config.needs_decoder and vae is None and mask_decoder is None:
        raise ValueError(f"loss {config.loss!r} with prompts_per_image={group_size} needs `vae` or `mask_decoder`.")
    device = mask_latents.device
    num_train_timesteps = scheduler.config.num_train_timesteps
    if config.uses_task_loss:
        timesteps = torch.full((rows,), num_train_timesteps - 1, dtype=torch.long, device=device)
        noise = torch.randn(mask_latents.shape, generator=generator, device=generator.device if generator else device)
        noise = noise.to(device=device, dtype=mask_latents.dtype)
    else:
        timesteps = sample_training_timesteps(
            rows // group_size,
            num_train_timesteps,
            bias_strategy=config.timestep_bias_strategy,
            bias_multiplier=config.timestep_bias_multiplier,
            bias_portion=config.timestep_bias_portion,
            generator=generator,
            device=device,
        ).repeat_interleave(group_size)
        noise = sample_training_noise(
            mask_latents, timesteps, num_train_timesteps, variant=config.noise_variant,
            strength=config.noise_strength, generator=generator,
        )
    noisy_latents = scheduler.add_noise(mask_latents, noise, timesteps)
    model_input = torch.cat([image_latents, noisy_latents.to(image_latents.dtype)], dim=1)
    model_pred = unet(model_input, timesteps, encoder_hidden_states=text_states, return_dict=False)[0]

    total = model_pred.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    if config.uses_latent_loss:
        latent = weighted_latent_loss(model_pred, _training_target(scheduler, mask_latents, noise, timesteps), valid)
        total = total + latent
        parts["latent"] = latent.item()
    if config.needs_decoder:
        x0 = predicted_original_sample(scheduler, model_pred, timesteps, noisy_latents)
        logits = decision_logits(vae, x0, config.mask_threshold, mask_decoder)
        if config.uses_task_loss:
            task = mask_task_loss(logits, masks, valid)
            total = total + config.e2e_weight * task
            parts["e2e"] = task.item()
        if group_size > 1:
            cross_entropy = multi_prompt_cross_entropy(logits, masks, valid, group_size)
            total = total + config.multi_prompt_weight * cross_entropy
            parts["multi_prompt"] = cross_entropy.item()
    return TrainingLoss(total, parts)


def encode_batch_images(vae, batch: dict, device, dtype) -> torch.Tensor:
    """Image latents of every row, encoding each distinct image of the batch once (K rows share one image)."""
    image_row = batch["image_row"]
    first_rows = torch.unique_consecutive(image_row, return_counts=True)[1].cumsum(0) - 1  # any row of each image
    latents = mask_codec.encode_pixels(vae, batch["pixel_values"][first_rows].to(device, dtype)).float()
    return latents[image_row.to(latents.device) - image_row.min().to(latents.device)]


def compute_batch_loss(
    unet,
    text_projection,
    scheduler,
    vae,
    batch: dict,
    class_token_states: torch.Tensor,
    config: TrainingLossConfig,
    seed: int,
    latent_cache: LatentCache | None = None,
    mask_decoder=None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> TrainingLoss:
    """`compute_training_loss` on a `collate_segmentation_batch` batch: `train_adapter.py`'s step before backward.

    The frozen VAE (or `latent_cache`) encodes on the device and in the dtype of `class_token_states` (every class
    name's frozen text-encoder states). Timesteps and noise come from `seed` alone (`batch_seed`), so a resumed run
    draws what the interrupted one would have; `autocast` wraps the U-Net pass and the decoding, not the projection.
    """
    device, dtype = class_token_states.device, class_token_states.dtype
    with torch.no_grad():
        if latent_cache is not None:
            image_latents, mask_latents = latent_cache.encode(vae, batch, device, dtype)
        else:
            image_latents = encode_batch_images(vae, batch, device, dtype)
            mask_latents = mask_codec.encode_masks(vae, batch["mask"].to(device, dtype)).float()
    generator = torch.Generator(device=mask_latents.device).manual_seed(seed)
    text_states = text_projection(class_token_states[batch["class_index"].to(device)].float())
    with autocast():
        return compute_training_loss(
            unet, scheduler, image_latents, mask_latents, text_states, masks=batch["mask"].to(device),
            valid=batch["valid"].to(device), config=config, generator=generator, vae=vae, mask_decoder=mask_decoder,
        )


def batch_seed(seed: int, process_index: int, batch_number: int) -> int:
    """A distinct 63-bit seed per (run seed, process, batch) for that batch's timesteps and noise."""
    return (seed * 1_000_003 + process_index * 7_919 + batch_number * 104_729) % (2**63 - 1)


class LatentCache:
    """VAE latents of fixed-crop samples, kept for the whole run (`--cache_latents`).

    The VAE is frozen and encodes to the posterior mean, so a sample whose crop never changes has the same image
    and mask latents in every epoch: encoding them again is wasted work (a quarter of each step of the demo
    recipe on a CPU). Samples with a random crop are encoded afresh every time. An absent-class target is the
    empty mask whatever the image, so all of them share one entry.
    """

    def __init__(self) -> None:
        self.image_latents: dict = {}
        self.mask_latents: dict = {}
        self.encoded = 0  # samples encoded (image or mask), for the log
        self.reused = 0

    def encode(self, vae, batch: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and mask latents of `batch`, as `mask_codec.encode_pixels` / `encode_masks` give them."""
        fixed = batch["fixed_crop"].tolist()
        indices, classes, negatives = batch["index"].tolist(), batch["class_index"].tolist(), batch["is_negative"].tolist()
        image_keys = [index if is_fixed else None for index, is_fixed in zip(indices, fixed)]
        mask_keys = [
            (("empty",) if negative else (index, class_index)) if is_fixed else None
            for index, class_index, negative, is_fixed in zip(indices, classes, negatives, fixed)
        ]
        image_latents = self._lookup(
            self.image_latents, image_keys, lambda rows: mask_codec.encode_pixels(vae, batch["pixel_values"][rows].to(device, dtype))
        )
        mask_latents = self._lookup(
            self.mask_latents, mask_keys, lambda rows: mask_codec.encode_masks(vae, batch["mask"][rows].to(device, dtype))
        )
        return image_latents, mask_latents

    def _lookup(self, store: dict, keys: list, encode_rows) -> torch.Tensor:
        missing, pending = [], set()  # a key met twice in one batch (K rows of one image) is encoded once
        for row, key in enumerate(keys):
            if key is None or (key not in store and key not in pending):
                missing.append(row)
                if key is not None:
                    pending.add(key)
        fresh = dict(zip(missing, encode_rows(missing).float())) if missing else {}
        for row in missing:
            if keys[row] is not None:
                store[keys[row]] = fresh[row].clone()  # a clone: a view would keep the whole batch alive
        self.encoded += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.stack([fresh[row] if row in fresh else store[key] for row, key in enumerate(keys)])
