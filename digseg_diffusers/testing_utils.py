"""Tiny randomly initialised components with the SD2 structure, for tests, benchmarks and offline demos.

Nothing here downloads anything. The U-Net keeps SD2's block layout (three cross-attention down levels, a
plain bottom level, linear projections in the transformers), scaled down to a few thousand parameters per
block, so code that selects modules "by structure" sees the same structure as on the real model.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenization import build_char_clip_tokenizer

SD2_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD2_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def make_tiny_unet(
    in_channels: int = 8,
    cross_attention_dim: int = 32,
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32),
    attention_head_dim: int | tuple[int, ...] = (2, 4, 4, 4),
    seed: int = 0,
) -> UNet2DConditionModel:
    """A 4-level U-Net laid out like SD2's (`CrossAttn` x3 + plain down, mirrored up, linear projections)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=SD2_DOWN_BLOCKS,
        up_block_types=SD2_UP_BLOCKS,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=8,
    )


def make_tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An 8x-downsampling `AutoencoderKL` with 4 latent channels, like SD's, but tiny."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def make_tiny_text_encoder(hidden_size: int = 32, max_length: int = 32, seed: int = 0) -> CLIPTextModel:
    """A 2-layer CLIP text transformer sized for the character-level tokenizer (514 tokens)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return CLIPTextModel(config).eval()


def make_tiny_clip_model(seed: int = 0):
    """A tiny random `CLIPModel` (text side sized for the char-level tokenizer; 32 px images, 8 px patches)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def make_tiny_class_proposer(seed: int = 0, **kwargs):
    """A `DiGSegClassProposer` around `make_tiny_clip_model` and the char-level tokenizer."""
    from .proposal import DiGSegClassProposer

    return DiGSegClassProposer(make_tiny_clip_model(seed), build_char_clip_tokenizer(), **kwargs)


SD2_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
"""SD2's noise schedule (scaled-linear betas over 1000 steps)."""


def make_ddim_scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    """DDIM with trailing spacing and SD2's scaled-linear betas, as DiGSeg uses at inference."""
    return DDIMScheduler(
        **SD2_BETAS,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )


def make_tiny_components(
    seed: int = 0, text_hidden_size: int = 24, cross_attention_dim: int = 32, prediction_type: str = "v_prediction"
) -> dict:
    """All components of a tiny DiGSeg pipeline in eval mode (text width != cross-attention width, as CLIP-L + SD2)."""
    from .text_projection import DiGSegTextProjection

    torch.manual_seed(seed)
    return {
        "unet": make_tiny_unet(cross_attention_dim=cross_attention_dim, seed=seed).eval(),
        "vae": make_tiny_vae(seed=seed).eval(),
        "scheduler": make_ddim_scheduler(prediction_type),
        "text_encoder": make_tiny_text_encoder(hidden_size=text_hidden_size, seed=seed),
        "tokenizer": build_char_clip_tokenizer(),
        "text_projection": DiGSegTextProjection(text_hidden_size, cross_attention_dim).eval(),
    }


def make_tiny_pipeline(seed: int = 0, **kwargs):
    """A complete, untrained, tiny `DiGSegPipeline` in eval mode."""
    from .pipeline_digseg import DiGSegPipeline

    pipe = DiGSegPipeline(**make_tiny_components(seed=seed), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd_base(path: str | os.PathLike, prediction_type: str = "epsilon", seed: int = 0) -> str:
    """Write a tiny Stable-Diffusion-layout folder (4-channel U-Net, VAE, DDPM scheduler, CLIP text, tokenizer).

    It stands in for an SD2 checkpoint in tests of `DiGSegPipeline.from_base_model`.
    """
    path = str(path)
    make_tiny_unet(in_channels=4, cross_attention_dim=32, seed=seed).save_pretrained(os.path.join(path, "unet"))
    make_tiny_vae(seed=seed).save_pretrained(os.path.join(path, "vae"))
    DDPMScheduler(**SD2_BETAS, prediction_type=prediction_type).save_pretrained(os.path.join(path, "scheduler"))
    make_tiny_text_encoder(hidden_size=32, seed=seed).save_pretrained(os.path.join(path, "text_encoder"))
    build_char_clip_tokenizer().save_pretrained(os.path.join(path, "tokenizer"))
    return path


HUB_CACHE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike, with_tree: bool = True) -> str:
    """Lay `folder` out the way huggingface_hub caches a downloaded model repo; returns the snapshot folder.

    With `with_tree`, the repo's file listing is cached too (``trees/<commit>.json``, as `snapshot_download`
    leaves it): offline loaders then take the same path as online ones (diffusers checks the listing for custom
    code and component files), not the shortcut for caches without a listing.
    """
    import hashlib
    import json
    import shutil

    org, name = repo_id.split("/")
    repo_dir = os.path.join(str(cache_dir), f"models--{org}--{name}")
    snapshot = os.path.join(repo_dir, "snapshots", HUB_CACHE_COMMIT)
    shutil.copytree(folder, snapshot)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as handle:
        handle.write(HUB_CACHE_COMMIT)
    if with_tree:
        files = {}
        for root, _, names in os.walk(snapshot):
            for file_name in names:
                path = os.path.join(root, file_name)
                with open(path, "rb") as handle:
                    blob = hashlib.sha1(handle.read()).hexdigest()
                files[os.path.relpath(path, snapshot).replace(os.sep, "/")] = {"size": os.path.getsize(path), "blob_id": blob}
        os.makedirs(os.path.join(repo_dir, "trees"), exist_ok=True)
        with open(os.path.join(repo_dir, "trees", f"{HUB_CACHE_COMMIT}.json"), "w") as handle:
            json.dump({"format_version": 1, "files": files}, handle)
    return snapshot


# ---------------------------------------------------------------------------------- Comparing results of two code paths

CROSS_PATH_ATOL = 1e-5
"""Largest difference allowed between float32 results of two *different* code paths on the tiny models.

Another kernel order (a permuted or re-allocated input, another batch split, memory-mapped vs copied weights, a
merged LoRA) changes float32 rounding only: measured up to 8.3e-7 on an Intel Xeon with AVX-512/AMX and ~1e-7 on
AMD EPYC for the tiny pipeline's probabilities. 1e-5 leaves a 10x margin and is still far below any real change
of behaviour (a different seed or weight changes probabilities by 1e-2 or more). The same path run twice stays
bit-exact and is compared with equality.
"""


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    import numpy as np

    return torch.from_numpy(np.asarray(value))


def assert_close_across_paths(actual, expected, atol: float = CROSS_PATH_ATOL, what: str = "values") -> None:
    """Assert two float results of different code paths agree within `atol` (shapes must match exactly)."""
    actual, expected = _as_tensor(actual).double(), _as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert difference <= atol, f"{what} differ by {difference:.3g} (> {atol:g}) between the two code paths"


def assert_masks_match_across_paths(
    masks, expected_masks, expected_probabilities, threshold: float, atol: float = CROSS_PATH_ATOL
) -> None:
    """Binary masks of two code paths may differ only where the probability is within `atol` of the threshold."""
    masks, expected_masks = _as_tensor(masks).bool(), _as_tensor(expected_masks).bool()
    probabilities = _as_tensor(expected_probabilities).double()
    assert masks.shape == expected_masks.shape, f"mask shape {tuple(masks.shape)} != {tuple(expected_masks.shape)}"
    differing = masks != expected_masks
    ambiguous = (probabilities - threshold).abs() <= atol
    bad = int((differing & ~ambiguous).sum())
    assert bad == 0, f"{bad} mask pixels differ where the probability is not within {atol:g} of {threshold}"


def assert_label_maps_match_across_paths(
    label_maps, expected_label_maps, expected_probabilities, background_threshold: float, atol: float = CROSS_PATH_ATOL
) -> None:
    """Label maps of two code paths may differ only at ties: where the two best prompts' probabilities are within
    `2 * atol` of each other, or the best one is within `atol` of `background_threshold`.

    `expected_probabilities` is ``[K, H, W]`` (the reference path's maps), labels are 0 = background, k + 1 = prompt k.
    """
    labels, expected = _as_tensor(label_maps).long(), _as_tensor(expected_label_maps).long()
    probabilities = _as_tensor(expected_probabilities).double()
    assert labels.shape == expected.shape, f"label map shape {tuple(labels.shape)} != {tuple(expected.shape)}"
    differing = labels != expected
    if not bool(differing.any()):
        return
    top = probabilities.topk(min(2, probabilities.shape[0]), dim=0).values
    near_tie = (top[0] - top[1]).abs() <= 2 * atol if top.shape[0] > 1 else torch.zeros_like(differing)
    near_background = (top[0] - background_threshold).abs() <= atol
    bad = int((differing & ~(near_tie | near_background)).sum())
    assert bad == 0, f"{bad} label-map pixels differ away from any tie (tolerance {atol:g})"
