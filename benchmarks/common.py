"""The benchmarks' harness: configurations, common flags, side-by-side timing, peak memory, FLOPs, results.

Timings on shared machines drift by several x from one minute to the next, so no benchmark here compares times
taken in different runs: every comparison runs its variants interleaved (A B A B ...) in one process and reports
the ratio of medians. Absolute seconds are printed for orientation only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Callable

import diffusers
import numpy as np
import psutil
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from digseg_diffusers import DiGSegPipeline, mask_codec
from digseg_diffusers.data.synthetic import generate_scene
from digseg_diffusers.demo import default_model_path
from digseg_diffusers.mask_decoder import DiGSegMaskDecoder, count_flops
from digseg_diffusers.testing_utils import make_tiny_components, make_tiny_unet, make_tiny_vae

# The repository: benchmarks run as modules from it (`python -m benchmarks.performance.bench_throughput ...`).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "performance", "results")
CONFIGS = ("tiny", "demo", "sd2")
PROMPTS = [
    "circle", "square", "triangle", "star", "ring", "cross", "heart", "sky",
    "tree", "road", "car", "person", "building", "grass", "water", "dog",
]


# SD2's sizes on the test components' layouts (the same block types, 8 U-Net input channels, 8x VAE).
SD2_UNET_SIZES = dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                      attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, norm_num_groups=32)
SD_VAE_SIZES = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=768)


def sd2_unet(device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """SD2's U-Net architecture (865.9M parameters) with random weights and DiGSeg's 8 input channels."""
    with torch.device(device):
        return UNet2DConditionModel.from_config({**make_tiny_unet().config, **SD2_UNET_SIZES}).eval()


def sd_vae(device: str | torch.device = "cpu") -> AutoencoderKL:
    """The SD 1/2 VAE architecture (83.7M parameters) with random weights."""
    with torch.device(device):
        return AutoencoderKL.from_config({**make_tiny_vae().config, **SD_VAE_SIZES}).eval()


def make_pipeline(config: str, light_decoder: bool = False, device: str = "cpu",
                  dtype: torch.dtype = torch.float32):
    """"tiny" (the test components), "demo" (the packaged demo model) or "sd2" (SD2 U-Net + SD VAE, random), moved
    to `device` and `dtype`. The text encoder of "sd2" is the tiny one projected to 1024: it runs once per distinct
    prompt and is not what this work measures."""
    if config == "tiny":
        pipe = DiGSegPipeline(**make_tiny_components())
    elif config == "demo":
        pipe = DiGSegPipeline.from_pretrained(default_model_path())
    elif config == "sd2":
        pipe = DiGSegPipeline(**{**make_tiny_components(cross_attention_dim=1024), "unet": sd2_unet(), "vae": sd_vae()})
    else:
        raise ValueError(f"unknown config {config!r}; use one of {CONFIGS}")
    pipe.set_progress_bar_config(disable=True)
    if light_decoder:
        torch.manual_seed(0)  # untrained: the cost is what is measured here, not the masks
        pipe.register_modules(mask_decoder=DiGSegMaskDecoder().eval())
    return pipe.to(device, dtype)


def scene_image(resolution: int, seed: int = 0) -> np.ndarray:
    """A synthetic scene (uint8 HWC) at `resolution`, so every run sees the same pixels."""
    return generate_scene(seed, size=resolution).image


def generators(num_rows: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(num_rows)]


def baseline_pipeline_class(ref: str):
    """`DiGSegPipeline` as it was at git revision `ref` (the whole package of that revision, imported under another
    name), so that one process can time the code before and after a change side by side."""
    folder = tempfile.mkdtemp(prefix="digseg_baseline_")
    archive = os.path.join(folder, "package.tar")
    subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", "-o", archive, ref, "digseg_diffusers"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    name = "digseg_baseline_" + "".join(c if c.isalnum() else "_" for c in ref)
    os.rename(os.path.join(folder, "digseg_diffusers"), os.path.join(folder, name))
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(f"{name}.pipeline_digseg").DiGSegPipeline
    finally:
        sys.path.remove(folder)


class CudaGraphed(torch.nn.Module):
    """`module`'s forward replayed from a CUDA graph, one graph per input signature (shapes, dtypes, other args).

    What `torch.compile(mode="reduce-overhead")` does, without compiling: a one-image SD2 call is bound by the host
    issuing ~2,200 operator calls per U-Net forward; a graph launches them at once. Tensor inputs are copied into the
    graph's static buffers, outputs copied out (the next replay overwrites them). Only for modules without host syncs
    that return tensors (or tuples): the U-Net with ``return_dict=False``, the VAE encoder, the light mask decoder.
    Other attributes are read from `module`.
    """

    def __init__(self, module: torch.nn.Module, warmup: int = 2):
        super().__init__()
        self.module = module
        self.warmup = warmup
        self._graphs: dict = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @staticmethod
    def _signature(args, kwargs) -> tuple:
        def describe(value):
            if torch.is_tensor(value):
                return ("tensor", tuple(value.shape), value.dtype, value.device)
            return ("value", value)

        return tuple(describe(a) for a in args) + tuple((k, describe(v)) for k, v in sorted(kwargs.items()))

    def forward(self, *args, **kwargs):
        if not any(torch.is_tensor(a) and a.is_cuda for a in list(args) + list(kwargs.values())):
            return self.module(*args, **kwargs)
        key = self._signature(args, kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args, kwargs)
        graph, static_args, static_kwargs, static_out = entry
        for static, value in zip(static_args, args):
            if torch.is_tensor(value):
                static.copy_(value)
        for name, value in kwargs.items():
            if torch.is_tensor(value):
                static_kwargs[name].copy_(value)
        graph.replay()
        if isinstance(static_out, tuple):
            return tuple(o.clone() for o in static_out)
        return static_out.clone()

    def _capture(self, args, kwargs):
        static_args = [a.clone() if torch.is_tensor(a) else a for a in args]
        static_kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuDNN / cuBLAS choose their kernels)
            for _ in range(self.warmup):
                self.module(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.module(*static_args, **static_kwargs)
        if isinstance(static_out, list):
            static_out = tuple(static_out)
        return graph, static_args, static_kwargs, static_out


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], repeats: int = 3, warmup: bool = True) -> dict:
    """Run the variants round-robin (A B C A B C ...) `repeats` times; per variant: all times and the median.

    Interleaving spreads the machine's load drift over all variants alike, so the ratio of medians is meaningful
    where absolute times are not.
    """
    if warmup:
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            gc.collect()
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()  # GPU work is asynchronous: stop the clock when it is done, not when it is queued
            times[name].append(time.perf_counter() - start)
    return {name: {"times": t, "median": statistics.median(t)} for name, t in times.items()}


class PeakMemory:
    """Peak memory while the block runs: RSS above the starting RSS (sampled every 2 ms), and CUDA max allocated
    above the start when CUDA is in use (`cuda_start_mb`: what was allocated before)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.cuda_peak_mb = self.cuda_start_mb = None
        self._process = psutil.Process()

    def __enter__(self):
        gc.collect()
        self._stop = threading.Event()
        self._start_rss = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc_info):
        synchronize()  # queued GPU work belongs to the block
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = (max(self._peak, self._process.memory_info().rss) - self._start_rss) / 2**20
        if torch.cuda.is_available():
            self.cuda_peak_mb = (torch.cuda.max_memory_allocated() - self._cuda_start) / 2**20
            self.cuda_start_mb = self._cuda_start / 2**20


def free_memory() -> None:
    """Collect garbage and give cached CUDA blocks back, so that the next variant's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory(variants: dict[str, Callable[[], object]]) -> dict[str, PeakMemory]:
    """Each variant run once more in its own `PeakMemory` (after timing it: lazy initialisation is not counted)."""
    peaks = {}
    for name, fn in variants.items():
        with PeakMemory() as peaks[name]:
            fn()
    return peaks


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture on the meta device (rebuilt from its config: no copy of an 866M-weight model)."""
    if hasattr(model, "config") and hasattr(type(model), "from_config"):
        with torch.device("meta"):
            return type(model).from_config(model.config).eval()
    return copy.deepcopy(model).to("meta")


def component_flops(pipe, resolution: int, rows: int = 1) -> dict[str, int]:
    """FLOPs of one image encode, one U-Net forward and one mask decode (VAE, and light when present) at
    `resolution`, counted on meta-device copies (shapes only: the SD2 sizes cost nothing to count)."""
    scale = pipe.vae_scale_factor
    side = resolution // scale
    unet, vae = meta_copy(pipe.unet), meta_copy(pipe.vae)
    with torch.device("meta"):
        pixels = torch.zeros(rows, 3, resolution, resolution)
        latents = torch.zeros(rows, vae.config.latent_channels, side, side)
        text = torch.zeros(rows, pipe.text_max_length, pipe.unet.config.cross_attention_dim)
        unet_input = torch.zeros(rows, unet.config.in_channels, side, side)
    flops = {
        "encode": count_flops(mask_codec.encode_pixels, vae, pixels),
        "unet": count_flops(lambda: unet(unet_input, 999, encoder_hidden_states=text)),
        "decode_vae": count_flops(mask_codec.decode_masks, vae, latents),
    }
    if getattr(pipe, "mask_decoder", None) is not None:
        light = meta_copy(pipe.mask_decoder)
        flops["decode_light"] = count_flops(mask_codec.decode_masks, vae, latents, mask_decoder=light)
    return flops


def machine_description() -> dict:
    cpu = platform.processor() or "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "diffusers": diffusers.__version__,
    }


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): a loaded host slows every variant down."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--output", default=None,
                        help="JSON file for the results (default: benchmarks/performance/results/)")
    return parser


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# How far two equal computations (rows batched differently) may differ per precision: bounds that catch wrong rows
# (off by > 1e-2), not rounding, on any CPU (SD2-size layers sum 1024-wide: 1.26e-5 in fp32 on a Sapphire Rapids CPU,
# above the tests' CROSS_PATH_ATOL). Half precision is loose because a *random* SD VAE decoder amplifies rounding.
OUTPUT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 0.15, torch.bfloat16: 0.15}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, then apply the common flags (`args.torch_dtype`, the CUDA check, torch threads); autograd off."""
    args = parser.parse_args(argv)
    args.torch_dtype = DTYPES[args.dtype]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    return args


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """Print the rows as a markdown table (after `title`); the table is returned to be stored with the results."""
    table = markdown_table(headers, rows)
    print(table if title is None else f"{title}\n{table}")
    return table


def write_results(name: str, args, payload: dict, results_dir: str = RESULTS_DIR) -> str:
    """`payload` with the arguments and the machine as JSON at `--output` (default: named by the settings)."""
    suffix = "" if args.device == "cpu" and args.dtype == "fp32" else f"_{args.device}_{args.dtype}"
    path = args.output or os.path.join(results_dir, f"{name}_{args.config}_{args.resolution}px{suffix}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arguments = {key: value for key, value in vars(args).items() if key != "torch_dtype"}
    if arguments.get("output"):  # no machine paths in the stored results
        arguments["output"] = os.path.relpath(arguments["output"], ROOT)
    payload = {"benchmark": name, "args": arguments, "machine": machine_description(), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    print(f"results: {path}")
    return path
