"""Train the light mask decoder (`DiGSegMaskDecoder`) for a given VAE on synthetic masks, and measure it.

The decoder learns to turn the frozen VAE's scaled mask latents (`mask_codec.encode_masks`, computed once) back into
the masks. The report compares, on validation-split masks, the IoU of the VAE decoder and of the light decoder from
the *same* latents, and the decode FLOPs of both at the training resolution and at 512 px.

    # a DiGSeg pipeline folder (or "digseg-demo"): its vae/ is used and the decoder is saved into a copy
    python training/train_mask_decoder.py --pretrained_model_name_or_path digseg-demo --output_dir out/md \
        --save_pipeline
    # a bare VAE folder
    python training/train_mask_decoder.py --pretrained_model_name_or_path path/to/vae --output_dir out/md

Outputs: OUTPUT/mask_decoder (`DiGSegMaskDecoder.from_pretrained`), OUTPUT/summary.json, and with `--save_pipeline`
OUTPUT/pipeline (the pipeline with the decoder registered; it decodes with it by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from digseg_diffusers import mask_codec
from digseg_diffusers.data.synthetic import generate_scene, split_seeds
from digseg_diffusers.evaluation.vae_study import decode_flops, load_vae, synthetic_class_masks
from digseg_diffusers.mask_decoder import DiGSegMaskDecoder, evaluate_mask_decoders, fit_mask_decoder

logger = logging.getLogger("train_mask_decoder")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="a DiGSeg pipeline folder (its vae/), 'digseg-demo', or a VAE folder")
    parser.add_argument("--output_dir", required=True, help='where the decoder (and with --save_pipeline the pipeline) is saved')
    parser.add_argument("--resolution", type=int, default=64, help='scene size in pixels')
    parser.add_argument("--num_train_scenes", type=int, default=1000, help='synthetic training scenes')
    parser.add_argument("--num_eval_scenes", type=int, default=200, help='held-out scenes for the IoU report')
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                        help="widths per level, latent resolution first; default 64 32 16 8 cut to the VAE's scale "
                             "(log2(scale) + 1 levels)")
    parser.add_argument("--layers_per_block", type=int, default=1, help='residual blocks per decoder level')
    parser.add_argument("--max_train_steps", type=int, default=1500, help='optimizer steps')
    parser.add_argument("--train_batch_size", type=int, default=32, help='masks per step')
    parser.add_argument("--learning_rate", type=float, default=2e-3, help='AdamW learning rate')
    parser.add_argument("--latent_noise_std", type=float, default=0.05,
                        help="Gaussian noise on the (unit-variance) latents during training, for robustness to "
                             "the denoiser's slightly off-manifold outputs")
    parser.add_argument("--num_distill_scenes", type=int, default=0,
                        help="with a pipeline: also train on the U-Net's own output latents for this many train "
                             "scenes, with the VAE decoder's probabilities as soft targets (the denoiser's latents "
                             "lie off the encoder's manifold; plain mask latents do not teach the decoder those)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold for the IoU")
    parser.add_argument("--save_pipeline", action="store_true",
                        help="also save the pipeline with the decoder registered to OUTPUT/pipeline")
    parser.add_argument("--seed", type=int, default=0, help='seed of the scenes and the initialisation')
    return parser.parse_args(argv)


def resolve_vae(name_or_path: str):
    """(vae, pipeline or None): a pipeline folder gives its VAE (and itself, to save the decoder into)."""
    from digseg_diffusers.demo import resolve_model_name

    path = str(resolve_model_name(name_or_path))
    if os.path.isfile(os.path.join(path, "model_index.json")):
        from digseg_diffusers import DiGSegPipeline

        pipe = DiGSegPipeline.from_pretrained(path)
        return pipe.vae.eval(), pipe
    return load_vae(path), None


@torch.no_grad()
def denoiser_latents(pipe, num_scenes: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's final latents for every visible class of `num_scenes` train scenes (seeds after the ones the
    mask set uses), and the VAE decoder's probabilities for them ``[M, H, W]`` as soft targets."""
    latents, targets = [], []
    pipe.set_progress_bar_config(disable=True)
    for scene_seed in split_seeds("train", num_scenes, seed_offset=5_000_000):
        scene = generate_scene(scene_seed, size=resolution)
        out = pipe(scene.image, scene.class_names, processing_resolution=0, output_latent=True, output_type="pt",
                   generator=torch.Generator().manual_seed(seed + scene_seed), mask_decoder="vae")
        latents.append(out.latents.float().cpu())
        targets.append(out.probabilities[0].float().cpu())
    return torch.cat(latents), torch.cat(targets)


@torch.no_grad()
def encode_in_chunks(vae, masks: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([mask_codec.encode_masks(vae, chunk) for chunk in masks.split(batch_size)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    vae, pipe = resolve_vae(args.pretrained_model_name_or_path)
    vae.requires_grad_(False)

    start = time.time()
    train_masks = synthetic_class_masks("train", args.num_train_scenes, args.resolution)
    eval_masks = synthetic_class_masks("val", args.num_eval_scenes, args.resolution)
    train_latents = encode_in_chunks(vae, train_masks).float()
    latent_std = float(train_latents.std())
    if args.num_distill_scenes:
        if pipe is None:
            raise ValueError("`--num_distill_scenes` needs a pipeline folder as `--pretrained_model_name_or_path`.")
        distill_latents, distill_targets = denoiser_latents(pipe, args.num_distill_scenes, args.resolution, args.seed)
        train_latents = torch.cat([train_latents, distill_latents])
        train_masks = torch.cat([train_masks, distill_targets])
        logger.info("+ %d denoiser latents with VAE-decoded soft targets", len(distill_latents))
    logger.info("%d train masks, %d eval masks, latent std %.3f (%.0f s)", len(train_masks), len(eval_masks),
                latent_std, time.time() - start)

    vae_scale = train_masks.shape[-1] // train_latents.shape[-1]
    widths = args.block_out_channels or [max(64 >> i, 8) for i in range(vae_scale.bit_length())]
    decoder = DiGSegMaskDecoder(
        latent_channels=train_latents.shape[1],
        block_out_channels=tuple(widths),
        layers_per_block=args.layers_per_block,
        input_scale=1.0 / latent_std,
    )
    if vae_scale != decoder.upsampling_factor:
        raise ValueError(
            f"`--block_out_channels` gives {decoder.upsampling_factor}x upsampling but the VAE downsamples "
            f"{vae_scale}x: give {vae_scale.bit_length()} widths."
        )
    losses = fit_mask_decoder(
        decoder,
        train_latents,
        train_masks,
        num_steps=args.max_train_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        latent_noise_std=args.latent_noise_std * latent_std,
        seed=args.seed,
        log_every=100,
        logger=logger,
    )
    train_seconds = time.time() - start

    report = evaluate_mask_decoders(vae, decoder, eval_masks, threshold=args.threshold)
    flops = {}
    for size in sorted({args.resolution, 512}):
        full, light = decode_flops(vae, decoder, size)
        flops[str(size)] = {"vae_decoder": full, "light_decoder": light, "ratio": full / light}
    summary = {
        "vae": args.pretrained_model_name_or_path,
        "num_train_masks": len(train_masks),
        "eval": report,
        "decode_flops_per_mask": flops,
        "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
        "vae_decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()) if hasattr(vae, "decoder") else None,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": train_seconds,
        "args": vars(args),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    decoder.save_pretrained(os.path.join(args.output_dir, "mask_decoder"))
    if args.save_pipeline:
        if pipe is None:
            raise ValueError("`--save_pipeline` needs a pipeline folder as `--pretrained_model_name_or_path`.")
        pipe.register_modules(mask_decoder=decoder)
        pipe.save_pretrained(os.path.join(args.output_dir, "pipeline"))
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info(
        "IoU vae %.4f light %.4f (difference %+.2f points); decode FLOPs at %d px: %.3g vs %.3g (%.0fx fewer)",
        report["iou_vae"], report["iou_light"], report["iou_difference_points"], args.resolution,
        flops[str(args.resolution)]["vae_decoder"], flops[str(args.resolution)]["light_decoder"],
        flops[str(args.resolution)]["ratio"],
    )
    return summary


if __name__ == "__main__":
    main()
