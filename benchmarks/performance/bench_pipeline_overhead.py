"""The pipeline's own overhead: a full call vs the sum of its raw component calls on the same inputs.

"Raw" runs only the model calls the pipeline makes (text encoder + projection per prompt, VAE encode, U-Net per
chunk and step, VAE decode per chunk) on tensors prepared in advance; the rest of a call (checks, resizing, noise,
scheduler, thresholds, label maps, numpy output) is the overhead. "Raw, cached text" leaves the text encoder out, as
a call with its prompts in the prompt cache does. `--baseline_ref REF` also times the pipeline of git revision REF
on the same components. Also prints the FLOPs of encode / U-Net / decode.

    python -m benchmarks.performance.bench_pipeline_overhead --config demo --k 1 --baseline_ref main
    python -m benchmarks.performance.bench_pipeline_overhead --config sd2 --resolution 512 --k 1 --device cuda \
        --dtype bf16
"""

from __future__ import annotations

import statistics
import time

import torch
from benchmarks import common

from digseg_diffusers import mask_codec


class ComponentClock:
    """Time spent inside the model calls (text encoder, projection, U-Net, VAE encoder / decoder, light decoder)
    during each call of a wrapped function: the rest of the call is the caller's own overhead. CPU only (on a
    GPU the clock would have to synchronise in every hook, which changes what it measures)."""

    def __init__(self, pipe):
        self.inside = 0.0
        self._start = None
        self.overheads: dict[str, list[float]] = {}
        modules = [pipe.text_encoder, pipe.text_projection, pipe.unet, getattr(pipe, "mask_decoder", None)]
        modules += [getattr(pipe.vae, name, None) for name in ("encoder", "decoder", "quant_conv", "post_quant_conv")]
        for module in (m for m in modules if isinstance(m, torch.nn.Module)):
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _enter(self, module, args):
        self._start = time.perf_counter()

    def _leave(self, module, args, output):
        self.inside += time.perf_counter() - self._start

    def wrap(self, name: str, fn):
        """`fn`, recording each call's (total time / time inside the models - 1) under `name`."""
        def timed():
            self.inside = 0.0
            start = time.perf_counter()
            result = fn()
            total = time.perf_counter() - start
            self.overheads.setdefault(name, []).append(total / self.inside - 1.0)
            return result

        return timed


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--flops_resolution", type=int, default=512)
    parser.add_argument("--baseline_ref", default=None, help="also time the pipeline of this git revision")
    args = common.parse_args(parser, argv)
    pipe = common.make_pipeline(args.config, device=args.device, dtype=args.torch_dtype)
    image = common.scene_image(args.resolution)
    prompts = common.PROMPTS[: args.k]
    k, size = args.k, args.resolution

    # Inputs of the raw calls, prepared once (what the pipeline computes before each model call).
    device, dtype = args.device, args.torch_dtype
    pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0).to(device, dtype)
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.text_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
    side = size // pipe.vae_scale_factor
    noise = torch.randn(k, pipe.vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    noise = noise.to(device, dtype)
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]

    def raw(text_encoder: bool = True):
        text = pipe.text_projection(pipe.text_encoder(tokens)[0]) if text_encoder else cached_text
        z_x = mask_codec.encode_pixels(pipe.vae, pixels)
        outputs = []
        for start in range(0, k, args.batch_size):
            rows = slice(start, start + args.batch_size)
            model_input = torch.cat([z_x.expand(noise[rows].shape[0], -1, -1, -1), noise[rows]], dim=1)
            outputs.append(pipe.unet(model_input, t, encoder_hidden_states=text[rows], return_dict=False)[0])
        latents = torch.cat(outputs)
        return torch.cat([mask_codec.decode_masks(pipe.vae, latents[i : i + args.batch_size])
                          for i in range(0, k, args.batch_size)])

    cached_text = pipe.text_projection(pipe.text_encoder(tokens)[0])

    def same_model(pipeline_class):
        """Another pipeline object (its own prompt cache) on the same modules and settings."""
        settings = {key: value for key, value in pipe.config.items()
                    if not key.startswith("_") and key not in pipe.components}
        other = pipeline_class(**pipe.components, **settings)  # not `from_pipe`: it rejects the baseline's classes
        other.set_progress_bar_config(disable=True)
        return other

    def call(pipeline):
        return lambda: pipeline(image, prompts, processing_resolution=0, num_inference_steps=1,
                                batch_size=args.batch_size, generator=common.generators(k))

    uncached = same_model(type(pipe))
    uncached.set_prompt_cache_size(0)
    variants = {
        "pipeline, cached prompts": call(pipe),
        "raw components, cached text": lambda: raw(text_encoder=False),
        "pipeline, cache off": call(uncached),
        "raw components": raw,
    }
    if args.baseline_ref:
        baseline = common.baseline_pipeline_class(args.baseline_ref)
        variants[f"pipeline at {args.baseline_ref}"] = call(same_model(baseline))
    clock = ComponentClock(pipe) if args.device == "cpu" else None
    timed = {name: clock.wrap(name, fn) if clock else fn for name, fn in variants.items()}
    timing = common.interleaved(timed, repeats=args.repeats)

    def ratio(a: str, b: str) -> tuple[float, float]:
        """(ratio of medians, median of per-round ratios): each round runs the variants back to back, so the
        second resists load drift best."""
        paired = statistics.median(x / y for x, y in zip(timing[a]["times"], timing[b]["times"]))
        return timing[a]["median"] / timing[b]["median"], paired

    comparisons = [("pipeline, cached prompts", "raw components, cached text"),
                   ("pipeline, cache off", "raw components"), ("pipeline, cache off", "pipeline, cached prompts")]
    if args.baseline_ref:
        comparisons += [(f"pipeline at {args.baseline_ref}", "raw components"),
                        (f"pipeline at {args.baseline_ref}", "pipeline, cached prompts")]
    ratios = {f"{a} / {b}": ratio(a, b) for a, b in comparisons}
    load = common.load_average()
    common.print_table(["variant", "ms per call (median)"], [[n, 1000 * t["median"]] for n, t in timing.items()],
                       f"{args.config} {size} px K={k} {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
                       f"load {load:.2f}")
    common.print_table(["ratio", "of medians", "median of per-round ratios"],
                       [[name, f"{r[0]:.3f}", f"{r[1]:.3f}"] for name, r in ratios.items()])
    overhead = ratios["pipeline, cached prompts / raw components, cached text"][1] - 1.0
    print(f"overhead of a call over its raw component calls: {100 * overhead:+.1f}% (median of per-round ratios)")
    self_time = None
    if clock:  # the same measure inside each call: immune to the load drifting between calls
        self_time = {name: statistics.median(clock.overheads[name][1:]) for name in variants}  # [0]: warm-up
        common.print_table(["variant", "time outside the model calls, share of the time inside (median per call)"],
                           [[name, f"{100 * value:+.1f}%"] for name, value in self_time.items()])
        print(f"per-call overhead of the pipeline with cached prompts: "
              f"{100 * self_time['pipeline, cached prompts']:+.1f}% (target <= 10%)")

    flops = {res: common.component_flops(pipe, res) for res in sorted({size, args.flops_resolution})}
    rows = []
    for res, f in flops.items():
        total = f["encode"] + k * (f["unet"] + f["decode_vae"])
        rows.append([res, f["encode"] / 1e9, f["unet"] / 1e9, f["decode_vae"] / 1e9,
                     f"{100 * k * f['decode_vae'] / total:.0f}%"])
    table = common.print_table(["px", "encode GFLOP", "U-Net GFLOP (1 row)", "VAE decode GFLOP (1 mask)",
                                f"decode share at K={k}"], rows)
    common.write_results("pipeline_overhead", args, {
        "timing": timing, "overhead_paired": overhead, "ratios": ratios, "load_average": load,
        "self_time_overhead": self_time, "flops": {str(r): f for r, f in flops.items()}, "flops_table": table,
    })


if __name__ == "__main__":
    main()
