"""The pipeline's own overhead: a full call vs the sum of its raw component calls on the same inputs.

"Raw" runs only the model calls the pipeline makes (text encoder + projection once per prompt, VAE encode once,
U-Net once per chunk and step, VAE decode per chunk) on tensors prepared in advance; everything else the
pipeline does (input checks, resizing, noise, scheduler, ensembling, thresholds, label maps, numpy output) is
the overhead. Also prints the FLOPs of encode / U-Net / decode counted with `torch.utils.flop_counter`.

    python benchmarks/bench_pipeline_overhead.py --config tiny --resolution 64 --k 4
    python benchmarks/bench_pipeline_overhead.py --config sd2 --resolution 128 --k 2 --repeats 2
    python benchmarks/bench_pipeline_overhead.py --config sd2 --resolution 512 --k 1 --device cuda --dtype bf16
"""

from __future__ import annotations

import statistics

import torch
from common import (
    PROMPTS,
    base_parser,
    component_flops,
    generators,
    interleaved,
    make_pipeline,
    markdown_table,
    scene_image,
    setup,
    write_results,
)

from digseg_diffusers import mask_codec


def main(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--flops_resolution", type=int, default=512)
    args = parser.parse_args(argv)
    setup(args)
    pipe = make_pipeline(args.config, device=args.device, dtype=args.torch_dtype)
    image = scene_image(args.resolution)
    prompts = PROMPTS[: args.k]
    k, size = args.k, args.resolution

    # Inputs of the raw calls, prepared once (what the pipeline computes before each model call).
    device, dtype = args.device, args.torch_dtype
    pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0).to(device, dtype)
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.text_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
    side = size // pipe.vae_scale_factor
    noise = torch.randn(k, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]

    def raw():
        text = pipe.text_projection(pipe.text_encoder(tokens)[0])
        z_x = mask_codec.encode_pixels(pipe.vae, pixels)
        outputs = []
        for start in range(0, k, args.batch_size):
            rows = slice(start, start + args.batch_size)
            model_input = torch.cat([z_x.expand(noise[rows].shape[0], -1, -1, -1), noise[rows]], dim=1)
            outputs.append(pipe.unet(model_input, t, encoder_hidden_states=text[rows], return_dict=False)[0])
        latents = torch.cat(outputs)
        return torch.cat([mask_codec.decode_masks(pipe.vae, latents[i : i + args.batch_size])
                          for i in range(0, k, args.batch_size)])

    def pipeline():
        return pipe(image, prompts, processing_resolution=0, num_inference_steps=1, batch_size=args.batch_size,
                    generator=generators(k))

    timing = interleaved({"pipeline": pipeline, "raw_components": raw}, repeats=args.repeats)
    overhead = timing["pipeline"]["median"] / timing["raw_components"]["median"] - 1.0
    # Each round runs the two back to back: the median of the per-round ratios resists load drift best.
    paired = statistics.median(p / r for p, r in zip(timing["pipeline"]["times"], timing["raw_components"]["times"]))
    print(f"{args.config} {size} px K={k} {args.device} {args.dtype}: pipeline {timing['pipeline']['median']:.3f}s, raw components "
          f"{timing['raw_components']['median']:.3f}s, overhead {100 * overhead:+.1f}% (ratio of medians), "
          f"{100 * (paired - 1):+.1f}% (median of per-round ratios) (target <= 15%)")

    flops = {res: component_flops(pipe, res) for res in sorted({size, args.flops_resolution})}
    rows = []
    for res, f in flops.items():
        total = f["encode"] + k * (f["unet"] + f["decode_vae"])
        rows.append([res, f["encode"] / 1e9, f["unet"] / 1e9, f["decode_vae"] / 1e9,
                     f"{100 * k * f['decode_vae'] / total:.0f}%"])
    table = markdown_table(["px", "encode GFLOP", "U-Net GFLOP (1 row)", "VAE decode GFLOP (1 mask)",
                            f"decode share at K={k}"], rows)
    print(table)
    path = write_results("pipeline_overhead", args, {"timing": timing, "overhead": overhead,
                                                      "overhead_paired": paired - 1.0,
                                                      "flops": {str(r): f for r, f in flops.items()},
                                                      "flops_table": table})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
