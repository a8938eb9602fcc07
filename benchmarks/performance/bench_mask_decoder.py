"""The light mask decoder vs the full VAE decoder: FLOPs, time (side by side), IoU on the synthetic set.

FLOPs: on meta-device copies of the tiny test VAE, the SD VAE and (optionally) a trained VAE. Time: K latents
decoded by each decoder, interleaved. IoU: synthetic validation masks encoded by the trained VAE, decoded by both
decoders from the same latents (`evaluate_mask_decoders`); with a pipeline, end to end.

    python -m benchmarks.performance.bench_mask_decoder --resolution 128 --k 4 \
        --vae_path OUT/quick_vae --mask_decoder_path OUT/md/mask_decoder
"""

from __future__ import annotations

import torch
from benchmarks import common

from digseg_diffusers import mask_codec
from digseg_diffusers.evaluation.vae_study import decode_flops, load_vae, synthetic_class_masks
from digseg_diffusers.mask_decoder import DiGSegMaskDecoder, evaluate_mask_decoders
from digseg_diffusers.testing_utils import make_tiny_vae


def pipeline_iou(pipeline_path: str, num_scenes: int, resolution: int) -> dict:
    """Segment val scenes (prompts = their visible classes) with each decoder; pooled IoU of the binary masks."""
    from digseg_diffusers import DiGSegPipeline
    from digseg_diffusers.evaluation.metrics import ConfusionMatrix
    from digseg_diffusers.data.synthetic import generate_scene, split_seeds

    pipe = DiGSegPipeline.from_pretrained(pipeline_path)
    pipe.set_progress_bar_config(disable=True)
    pooled = {"vae": ConfusionMatrix(2), "light": ConfusionMatrix(2)}  # mask vs rest, summed over the scenes
    num_masks = 0
    for seed in split_seeds("val", num_scenes):
        scene = generate_scene(seed, size=resolution)
        targets = torch.from_numpy(scene.label)[None] == torch.tensor(scene.class_indices)[:, None, None] + 1
        num_masks += len(scene.class_indices)
        for decoder, confusion in pooled.items():
            out = pipe(scene.image, scene.class_names, processing_resolution=0, output_type="pt",
                       generator=torch.Generator().manual_seed(seed), mask_decoder=decoder)
            confusion.update(out.masks[0].long(), targets.long())
    return {"num_scenes": num_scenes, "num_masks": num_masks,
            **{f"iou_{name}": confusion.binary_scores(positive_class=1)["iou"] for name, confusion in pooled.items()}}


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(config="sd2", resolution=128)
    parser.add_argument("--k", type=int, default=4, help="masks decoded per timed call")
    parser.add_argument("--vae_path", default=None, help="a trained VAE folder (for the IoU and its FLOPs)")
    parser.add_argument("--mask_decoder_path", default=None, help="the light decoder trained for --vae_path")
    parser.add_argument("--num_eval_scenes", type=int, default=200)
    parser.add_argument("--eval_resolution", type=int, default=64)
    parser.add_argument("--pipeline_path", default=None,
                        help="a trained DiGSeg pipeline with a `mask_decoder` (e.g. train_mask_decoder.py "
                             "--save_pipeline output): end-to-end IoU with each decoder on val scenes")
    parser.add_argument("--num_pipeline_scenes", type=int, default=50)
    args = common.parse_args(parser, argv)

    torch.manual_seed(0)
    default_decoder = DiGSegMaskDecoder().eval()
    vaes = {"tiny test VAE (8,16,16,16)": (make_tiny_vae().eval(), DiGSegMaskDecoder(block_out_channels=(16, 8, 8, 8))),
            "SD VAE (128,256,512,512)": (common.sd_vae("meta"), default_decoder)}
    trained = None
    if args.vae_path:
        trained_vae = load_vae(args.vae_path)
        trained_decoder = (DiGSegMaskDecoder.from_pretrained(args.mask_decoder_path).eval()
                           if args.mask_decoder_path else default_decoder)
        widths = tuple(trained_vae.config.block_out_channels)
        vaes[f"trained VAE {widths}"] = (trained_vae, trained_decoder)
        trained = (trained_vae, trained_decoder)

    flop_rows, flops = [], {}
    for name, (vae, decoder) in vaes.items():
        for res in (64, 256, 512):
            full, light = decode_flops(vae, decoder, res)
            flops[f"{name} @ {res}"] = {"vae": full, "light": light}
            flop_rows.append([name, tuple(decoder.config.block_out_channels), res, full / 1e9, light / 1e9,
                              f"{full / light:.0f}x"])
    flop_table = common.print_table(["VAE", "light widths", "px", "VAE decode GFLOP", "light GFLOP", "fewer FLOPs"],
                                    flop_rows)

    # Time: the SD VAE architecture (random weights; the cost does not depend on them) vs the default decoder.
    vae = common.sd_vae()
    side = args.resolution // 8
    latents = torch.randn(args.k, 4, side, side, generator=torch.Generator().manual_seed(0))
    variants = {"vae_decoder": lambda: mask_codec.decode_masks(vae, latents),
                "light_decoder": lambda: mask_codec.decode_masks(vae, latents, mask_decoder=default_decoder)}
    timing = common.interleaved(variants, repeats=args.repeats)
    memory = {name: peak.peak_rss_mb for name, peak in common.peak_memory(variants).items()}
    speedup = timing["vae_decoder"]["median"] / timing["light_decoder"]["median"]
    time_table = common.print_table(
        ["decoder", f"s per {args.k} masks @ {args.resolution} px", "speed-up", "peak RSS MB"],
        [["SD VAE decoder", timing["vae_decoder"]["median"], 1.0, memory["vae_decoder"]],
         ["light decoder (64,32,16,8)", timing["light_decoder"]["median"], speedup, memory["light_decoder"]]])

    iou, iou_table = None, None
    if trained is not None:
        masks = synthetic_class_masks("val", args.num_eval_scenes, args.eval_resolution)
        iou = evaluate_mask_decoders(trained[0], trained[1], masks)
        iou_table = common.print_table(
            ["masks (val split)", "IoU full VAE decoder", "IoU light decoder", "difference (points)"],
            [[iou["num_masks"], iou["iou_vae"], iou["iou_light"], iou["iou_difference_points"]]])
    end_to_end, end_to_end_table = None, None
    if args.pipeline_path:
        end_to_end = pipeline_iou(args.pipeline_path, args.num_pipeline_scenes, args.eval_resolution)
        end_to_end_table = common.print_table(
            ["scenes (val)", "class masks", "IoU with VAE decoder", "IoU with light decoder", "difference (points)"],
            [[end_to_end["num_scenes"], end_to_end["num_masks"], end_to_end["iou_vae"], end_to_end["iou_light"],
              100 * (end_to_end["iou_light"] - end_to_end["iou_vae"])]])
    common.write_results("mask_decoder", args, {"end_to_end": end_to_end, "end_to_end_table": end_to_end_table,
                                                 "flops": flops, "flop_table": flop_table, "timing": timing,
                                                 "peak_rss_mb": memory, "speedup": speedup, "time_table": time_table,
                                                 "iou": iou, "iou_table": iou_table})


if __name__ == "__main__":
    main()
