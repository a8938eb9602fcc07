"""Training throughput of `train_adapter.py`'s step at SD2 size: samples/s, peak memory, model FLOP utilisation.

The step is the script's own: `accelerate` (mixed precision, backward, gradient clipping), `compute_batch_loss`
(the trainable text projection, `compute_training_loss`), AdamW; latents come from the frozen VAE or, with cached
latents, from the script's `LatentCache` (what `--cache_latents` serves after the first epoch). Weights are random
(SD2's U-Net and the SD VAE); the text encoder is not part of a step (the script encodes the class names once). Variants of one
adapter mode are timed interleaved; the modes run one after the other (one SD2 U-Net in memory at a time), so
compare modes with care on a loaded host. Model FLOPs are counted (`FlopCounterMode`) on the step without gradient
checkpointing (recomputation is work, not model FLOPs); MFU = model FLOPs / time / `--peak_tflops`.

    python -m benchmarks.performance.bench_training_throughput --config sd2 --resolution 128 --batch_sizes 1 2
    python -m benchmarks.performance.bench_training_throughput --config sd2 --resolution 512 --device cuda \
        --mixed_precision bf16 --batch_sizes 1 4 8 --repeats 3
    python -m benchmarks.performance.bench_training_throughput --config tiny --resolution 64 --repeats 1  # smoke test
"""

from __future__ import annotations

import itertools

import torch
from accelerate import Accelerator
from benchmarks import common
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

from digseg_diffusers.adapter import DiGSegAdapterConfig, apply_adapter
from digseg_diffusers.testing_utils import make_tiny_unet
from digseg_diffusers.text_projection import DiGSegTextProjection
from digseg_diffusers.training.step import LOSSES, LatentCache, TrainingLossConfig, compute_batch_loss

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched against `torch.cuda.get_device_name` (first hit).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,  # fp16/bf16 with fp16 accumulation; 82.6 with fp32 accumulation
    "RTX 3090": 71.0,
}
TEXT_TOKENS, TEXT_WIDTH = 77, 1024  # OpenCLIP-H, SD2's text encoder
VAE_PARAMETERS = 83_653_863  # the SD VAE


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(0)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def build_models(config: str, device: str = "cpu"):
    """A fresh random U-Net and text projection of the config's size (SD2: OpenCLIP-H width -> 1024)."""
    torch.manual_seed(0)
    if config not in ("sd2", "tiny"):
        raise SystemExit(f"--config {config}: use sd2 or tiny")
    with torch.device(device):
        if config == "sd2":
            return common.sd2_unet(device).train(), DiGSegTextProjection(TEXT_WIDTH, 1024).train(), TEXT_WIDTH
        return make_tiny_unet().train(), DiGSegTextProjection(24, 32).train(), 24


def saved_activation_bytes(config: str, mode: str, resolution: int, batch: int, rank: int,
                           checkpointing: bool) -> tuple:
    """Bytes the U-Net step keeps for backward (tensors saved by autograd, weights excluded), counted on the meta
    device (shapes only: no memory, no compute), and the trainable / all parameter counts.

    fp32 activations: an upper bound for bf16 autocast as long as attention is not materialised (flash /
    memory-efficient attention on GPUs). With gradient checkpointing, the checkpointed blocks' inputs are held by
    the checkpoint, not saved through autograd's hooks: the count is then a lower bound (~0.1 GB/sample more).
    """
    with torch.device("meta"):
        unet, text_projection, text_width = build_models(config, "meta")
        trainable = apply_adapter(unet, text_projection, DiGSegAdapterConfig(mode=mode, rank=rank, alpha=rank))
        if checkpointing:
            unet.enable_gradient_checkpointing()
        weights = {p.untyped_storage()._cdata for p in itertools.chain(unet.parameters(), text_projection.parameters())}
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in weights:
                saved[storage._cdata] = storage.nbytes()
            return tensor

        side = resolution // 8
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            states = text_projection(torch.zeros(batch, TEXT_TOKENS, text_width))
            unet(torch.zeros(batch, unet.config.in_channels, side, side), torch.full((batch,), 500),
                 encoder_hidden_states=states)
        counts = (sum(p.numel() for p in trainable),
                  sum(p.numel() for p in itertools.chain(unet.parameters(), text_projection.parameters())))
    return sum(saved.values()), *counts


def memory_estimate(args) -> tuple[str, list]:
    """The estimated GPU memory of a train_adapter.py step at `--estimate_resolution` (bf16 mixed precision), printed:
    fp32 weights of the U-Net and projection (accelerate keeps them), fp32 gradients and AdamW's two moments of the
    trainable ones, the frozen VAE and text encoder in bf16, and the activations counted on the meta device."""
    gib = 2**30
    frozen = (VAE_PARAMETERS + args.text_encoder_parameters) * 2
    rows, cells = [], []
    for mode, checkpointing, batch in itertools.product(args.modes, (False, True), args.estimate_batch_sizes):
        activations, trainable, parameters = saved_activation_bytes(
            args.config, mode, args.estimate_resolution, batch, args.rank, checkpointing)
        persistent = parameters * 4 + trainable * 12 + frozen
        total = persistent + activations
        rows.append({"mode": mode, "gradient_checkpointing": checkpointing, "batch_size": batch,
                     "persistent_gib": persistent / gib, "activations_gib": activations / gib,
                     "total_gib": total / gib})
        cells.append([mode, "on (lower bound)" if checkpointing else "off", batch, persistent / gib,
                      activations / gib, total / gib])
    headers = ["mode", "grad. checkpointing", "batch", "weights + optimizer GiB", "activations GiB", "total GiB"]
    table = common.print_table(headers, cells, f"\nestimated GPU memory of a step at {args.estimate_resolution} px, "
                               "bf16 mixed precision (activations counted in fp32 on the meta device: an upper bound "
                               "without checkpointing)")
    return table, rows


def make_batch(rows: int, resolution: int, seed: int) -> dict:
    """A batch as `collate_segmentation_batch` gives it (fixed crops, so that the latent cache can hold it)."""
    generator = torch.Generator().manual_seed(seed)
    masks = (torch.rand(rows, 1, resolution, resolution, generator=generator) > 0.5).float()
    return {
        "pixel_values": torch.rand(rows, 3, resolution, resolution, generator=generator) * 2 - 1,
        "mask": masks,
        "valid": torch.ones_like(masks),
        "class_index": torch.arange(rows) % 8,
        "is_negative": torch.zeros(rows, dtype=torch.bool),
        "index": torch.arange(rows) + 1000 * seed,
        "fixed_crop": torch.ones(rows, dtype=torch.bool),
        "image_row": torch.arange(rows),
    }


def main(argv=None) -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(config="sd2", resolution=128, repeats=2)
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--gradient_checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--latents", nargs="+", choices=("cached", "encoded"), default=["cached", "encoded"])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="as train_adapter.py (default: bf16 on CUDA, no on the CPU)")
    parser.add_argument("--loss", choices=LOSSES, default="latent")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the accelerator's peak for MFU (default: PEAK_TFLOPS by GPU name; none on the CPU)")
    parser.add_argument("--estimate_resolution", type=int, default=512,
                        help="also estimate the GPU memory of a step at this size (meta device; 0: skip)")
    parser.add_argument("--estimate_batch_sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--text_encoder_parameters", type=float, default=123_060_480,
                        help="frozen text encoder kept on the device (default: CLIP ViT-L/14's text tower)")
    args = common.parse_args(parser, argv)
    torch.set_grad_enabled(True)  # a training step
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device.startswith("cuda") else "no"
    args.dtype = {"no": "fp32"}.get(args.mixed_precision, args.mixed_precision)  # names the results file
    device = torch.device(args.device)
    weight_dtype = common.DTYPES[args.dtype]
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    peak = peak_tflops(args)

    pipe = common.make_pipeline(args.config)  # its VAE and scheduler config (the U-Net is built per mode below)
    vae = pipe.vae.to(device, dtype=weight_dtype).requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    del pipe
    loss_config = TrainingLossConfig(loss=args.loss)
    batches = {b: make_batch(b, args.resolution, seed=b) for b in args.batch_sizes}
    rows, results = [], []
    for mode in args.modes:
        unet, text_projection, text_width = build_models(args.config)
        adapter = DiGSegAdapterConfig(mode=mode, rank=args.rank, alpha=args.rank)
        trainable = apply_adapter(unet, text_projection, adapter)
        unet.to(device)
        text_projection.to(device)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        unet, text_projection, optimizer = accelerator.prepare(unet, text_projection, optimizer)
        raw_unet = accelerator.unwrap_model(unet)
        token_states = torch.randn(8, TEXT_TOKENS, text_width, device=device, dtype=weight_dtype)
        latent_cache = LatentCache()
        for batch in batches.values():
            latent_cache.encode(vae, batch, device, weight_dtype)  # as after the first epoch

        def step(batch: dict, checkpointing: bool, cached: bool):
            def run():
                if checkpointing:
                    raw_unet.enable_gradient_checkpointing()
                else:
                    raw_unet.disable_gradient_checkpointing()
                loss = compute_batch_loss(  # train_adapter.py's step from here on
                    unet, text_projection, noise_scheduler, vae, batch, token_states, loss_config, seed=0,
                    latent_cache=latent_cache if cached else None, autocast=accelerator.autocast,
                )
                accelerator.backward(loss.loss)
                accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return run

        grid = itertools.product(args.batch_sizes, args.gradient_checkpointing, args.latents)
        variants = {(size, ckpt, latents): step(batches[size], ckpt == "on", latents == "cached")
                    for size, ckpt, latents in grid}
        counted = {}
        for key, fn in variants.items():  # the first step of each variant (optimizer state, lazy init) is counted
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            counted[key] = counter.get_total_flops()
        common.synchronize()
        memory = common.peak_memory(variants)
        timing = common.interleaved(variants, repeats=args.repeats, warmup=False)
        trainable_count = sum(p.numel() for p in trainable)
        parameter_count = sum(p.numel() for p in itertools.chain(raw_unet.parameters(), text_projection.parameters()))
        for key, t in timing.items():
            size, checkpointing, latents = key
            model_flops = counted.get((size, "off", latents), counted[key])
            seconds = t["median"]
            tflops = model_flops / seconds / 1e12
            block = memory[key]
            on_cuda = block.cuda_peak_mb is not None
            result = {
                "mode": mode, "batch_size": size, "gradient_checkpointing": checkpointing, "latents": latents,
                "seconds_per_step": seconds, "samples_per_s": size / seconds,
                "model_tflop_per_step": model_flops / 1e12, "counted_tflop_per_step": counted[key] / 1e12,
                "achieved_tflops": tflops, "mfu": tflops / peak if peak else None, "cuda_peak_mb": block.cuda_peak_mb,
                # weights, gradients and optimizer state included: what has to fit on the card
                "cuda_max_allocated_mb": block.cuda_peak_mb + block.cuda_start_mb if on_cuda else None,
                "step_rss_growth_mb": block.peak_rss_mb, "trainable_parameters": trainable_count,
                "parameters": parameter_count, "times": t["times"],
            }
            results.append(result)
            rows.append([mode, size, checkpointing, latents, 1000 * seconds, size / seconds, model_flops / 1e9,
                         1000 * tflops, f"{100 * result['mfu']:.1f}%" if peak else "-",
                         f"{result['cuda_max_allocated_mb']:.0f}" if on_cuda
                         else f"{block.peak_rss_mb:.0f} (RSS growth)"])
            print(f"{mode:>4} batch {size} checkpointing {checkpointing:>3} latents {latents:>7}: "
                  f"{size / seconds:7.2f} samples/s, {tflops:.3f} TFLOP/s", flush=True)
        print(f"{mode}: {trainable_count:,} trainable of {parameter_count:,} parameters")
        del unet, text_projection, optimizer, raw_unet, variants, latent_cache
        accelerator.free_memory()  # and collects garbage, empties the CUDA cache

    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    load = common.load_average()
    table = common.print_table(
        ["mode", "batch", "grad. checkpointing", "latents", "ms / step", "samples/s", "model GFLOP / step", "GFLOP/s",
         "MFU", "CUDA peak MB (all)" if cuda else "step peak MB"], rows,
        f"\n{args.config}, {args.resolution} px, mixed precision {args.mixed_precision}, loss {args.loss}, "
        f"{device_name}, load {load:.2f}, peak {peak or '-'} TFLOP/s")
    estimate_table, estimate = None, None
    if args.estimate_resolution:
        estimate_table, estimate = memory_estimate(args)
    common.write_results("training_throughput", args, {"results": results, "table": table, "peak_tflops": peak,
                                                        "load_average": load, "memory_estimate": estimate,
                                                        "memory_estimate_table": estimate_table})


if __name__ == "__main__":
    main()
