#!/usr/bin/env python
"""Train a DiGSeg adapter (method.md section 3) with accelerate.

    accelerate launch training/train_adapter.py \
        --base_model stabilityai/stable-diffusion-2 --text_encoder openai/clip-vit-large-patch14 \
        --dataset_format ade20k --train_data_dir /data/ADEChallengeData2016 --output_dir digseg-ade20k

One sample = one image and one queried class; the U-Net learns to denoise that class's mask latent, conditioned
on the image latent (concatenated) and the class name (cross-attention). The VAE and text encoder stay frozen; the
adapter (LoRA or "full" weights on the selected cross-attention projections and the mid-block attention), `conv_in`
and the text projection train. Runs on one CPU, several processes, one or many GPUs and several machines through
accelerate's launcher.

Nothing is lost when the process is killed at any moment: a checkpoint (`save_state`: the trainable weights and
the optimizer/scheduler/RNG state), the adapter, the pipeline and train_summary.json each appear only once complete
(`digseg_diffusers.training.checkpointing`); `--resume_from_checkpoint latest` continues from the newest complete
checkpoint; resuming a finished run does nothing. (accelerate's `automatic_checkpoint_naming` is not used: it
rotates old checkpoints out before the new one is complete.)

Before any model loads, each of these ends with one line and exit code 2: an `--output_dir` that holds another run
(unless `--resume_from_checkpoint` continues it or `--overwrite_output_dir` removes its outputs first); a checkpoint
of a run with other settings (`SETTINGS_THAT_MAY_CHANGE_ON_RESUME` lists those a resume may change); an unreadable
dataset; a model source that is neither cached nor reachable. A full disk while saving ends with one line and exit
code 1, everything written before intact and no partial checkpoint left.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

# Only light modules (the standard library, the package's file helpers) are imported here: `--help` and every
# argument or input error answer before torch, diffusers and transformers are imported (`train` imports them).
from digseg_diffusers.atomic_io import atomic_write_json, staged_directory
from digseg_diffusers.training.checkpointing import (
    CheckpointError,
    DiskFullError,
    TrainingRecord,
    checkpoint_settings,
    clear_previous_run,
    find_latest_checkpoint,
    previous_run,
    read_training_state,
    reporting_full_disk,
    resolve_resume_checkpoint,
    save_checkpoint,
    saved_step,
    settings_differences,
)

if TYPE_CHECKING:
    import torch

    from digseg_diffusers.training.step import TrainingLossConfig

PROG = "train_adapter.py"
ADAPTER_SUBFOLDER = "adapter"
ENTIRE_UNET_WEIGHTS = "unet.safetensors"
DECODER_WEIGHTS = "task_decoder.safetensors"  # the co-trained decoder (--train_decoder) in checkpoints
SUMMARY_NAME = "train_summary.json"
PIPELINE_SUBFOLDER = "pipeline"
RUN_OUTPUTS = (ADAPTER_SUBFOLDER, PIPELINE_SUBFOLDER, SUMMARY_NAME)
"""A run's final outputs in --output_dir (with its checkpoint-N folders: what marks a folder as holding a run)."""

# The choices of the library's options, written out so that `--help` needs no torch import;
# tests/test_training_cli.py checks them against digseg_diffusers (adapter.ADAPTER_MODES, data.READERS,
# noise.NOISE_VARIANTS / TIMESTEP_BIAS_STRATEGIES, training.step.LOSSES).
ADAPTER_MODES = ("lora", "full")
DATASET_FORMATS = ("ade20k", "cityscapes", "coco_stuff", "folder", "pascal_context")
NOISE_VARIANTS = ("gaussian", "annealed", "multires", "multires_annealed")
TIMESTEP_BIAS_STRATEGIES = ("none", "later", "earlier")
LOSSES = ("latent", "e2e", "latent+e2e")

TRACKER_PACKAGES = {  # accelerate's trackers and the packages each needs (accelerate.utils.imports)
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "comet_ml": ("comet_ml",),
    "mlflow": ("mlflow",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "aim": ("aim",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}

SETTINGS_THAT_MAY_CHANGE_ON_RESUME = frozenset({
    # where and what is written, and how it is reported
    "output_dir", "logging_dir", "report_to", "save_pipeline", "push_to_hub", "hub_model_id", "hub_token",
    "dataset_name", "resume_from_checkpoint", "overwrite_output_dir",
    # how long and how often: extending a finished run, saving more or less often
    "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    # validation only measures
    "validation_split", "validation_steps", "num_validation_images", "validation_inference_steps",
    "validation_resolution",
    # how the same computation is run (speed, memory, the hardware): not what is trained
    "mixed_precision", "gradient_checkpointing", "cache_latents", "dataloader_num_workers",
})
"""Options a resume may change. Every other recorded option (the model, the adapter's shape, the data, the loss,
the optimizer and schedule, the seed, the batch) must equal the checkpoint's, or the resume is refused: a run
continued with other settings is another run mixed into the first."""

LOCAL_INPUTS = ("pretrained_model_name_or_path", "base_model", "text_encoder", "resume_adapter", "train_data_dir",
                "class_names_file")
"""Options that may name local files or folders: recorded as absolute paths, so that resuming from another working
folder compares the same inputs (moving the data to another path counts as a change)."""

EXAMPLE = """\
example (the model ids are downloaded once, then read from the Hugging Face cache):
  accelerate launch training/train_adapter.py \\
    --base_model stabilityai/stable-diffusion-2 --text_encoder openai/clip-vit-large-patch14 \\
    --dataset_format ade20k --train_data_dir /data/ADEChallengeData2016 --validation_split validation \\
    --output_dir digseg-ade20k
  continue it where it stopped (same arguments):  ... --resume_from_checkpoint latest

Every option also answers to its dashed spelling (--output-dir for --output_dir). Offline, set HF_HUB_OFFLINE=1
with the models in the Hugging Face cache, or pass local folders.
"""


def fail(message: str, code: int = 2, every_process: bool = False) -> NoReturn:
    """End the run with one line on stderr: `code` 2 for a command that cannot run, 1 for a run that failed.

    Under `accelerate launch` every process meets the same setup error; only each machine's first one prints it.
    """
    if every_process or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def note(message: str, level: int = logging.INFO) -> None:
    """Log before the Accelerator exists (accelerate's logger needs it), once per machine."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        logging.getLogger(PROG).log(level, message)


def installed_trackers() -> list[str]:
    """The trackers `--report_to` can use here: those whose package is installed (found without importing it)."""
    return [name for name, packages in TRACKER_PACKAGES.items() if any(importlib.util.find_spec(p) for p in packages)]


def default_tracker() -> str:
    """TensorBoard when it is installed (local files, no account), else "none". Trackers that need an account or a
    server (wandb, ...) are only used when asked for: a first run should not stop at a login prompt."""
    return "tensorboard" if "tensorboard" in installed_trackers() else "none"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default, the epilog as written, and an option's two spellings sharing one metavar."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required:
            return f"{help_text} (required)"
        if "default" in help_text:  # the help says it in words ("default: the base's own")
            return help_text
        return super()._get_help_string(action)


def option_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """An argument group whose every `--snake_case` option also answers to `--snake-case`."""
    group = parser.add_argument_group(title)
    add_argument = group.add_argument

    def add(*names: str, **kwargs):
        dashed = [name.replace("_", "-") for name in names if name.startswith("--") and "_" in name]
        return add_argument(*names, *dashed, **kwargs)

    group.add_argument = add
    return group


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a DiGSeg adapter (run it with `accelerate launch`, or plain python for one process).",
        usage=f"{PROG} (--pretrained_model_name_or_path ID | --base_model ID) --train_data_dir DIR --output_dir DIR "
        "[options]",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    model = option_group(parser, "model")
    model.add_argument(
        "--pretrained_model_name_or_path", metavar="ID",
        help="A DiGSeg pipeline folder or Hub id to start from (this or --base_model).",
    )
    model.add_argument(
        "--base_model", metavar="ID",
        help="A Stable Diffusion (SD2-family) folder or Hub id to build DiGSeg from (this or "
        "--pretrained_model_name_or_path).",
    )
    model.add_argument("--text_encoder", metavar="ID", help="Text encoder for --base_model (default: the base's own).")
    model.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model to load.")
    model.add_argument(
        "--adapter_mode", choices=ADAPTER_MODES, default="lora",
        help="'lora': low-rank updates of the selected weights (PEFT); 'full': train those weights themselves.",
    )
    model.add_argument(
        "--levels", type=int, nargs="*", default=None,
        help="Resolution levels to adapt (default: the two middle cross-attention levels).",
    )
    model.add_argument("--rank", type=int, default=8, help="LoRA rank r.")
    model.add_argument(
        "--lora_alpha", type=float, default=8.0, help="LoRA alpha (the update is scaled by alpha / rank).",
    )
    model.add_argument("--no_mid_block", action="store_true", help="Leave the mid-block attention frozen.")
    model.add_argument("--no_conv_in", action="store_true", help="Leave conv_in frozen.")
    model.add_argument(
        "--resume_adapter", default=None, metavar="ID",
        help="Start from the weights of a saved adapter (folder or Hub id).",
    )
    model.add_argument(
        "--train_entire_unet",
        action="store_true",
        help="Train every U-Net weight (for small models trained from scratch, like the embedded demo model); "
        "checkpoints then hold the whole U-Net. Implies --save_pipeline.",
    )

    data = option_group(parser, "data")
    data.add_argument(
        "--dataset_format", choices=DATASET_FORMATS, default="folder",
        help="Dataset layout: 'folder' (docs/data_format.md) or a benchmark's own layout.",
    )
    data.add_argument("--train_data_dir", required=True, metavar="DIR", help="Root folder of the dataset.")
    data.add_argument("--train_split", default=None, help="Split name (default: the reader's training split).")
    data.add_argument("--validation_split", default=None, help="Split for periodic validation (default: none).")
    data.add_argument(
        "--class_names_file", default=None, metavar="FILE",
        help="Override the dataset's class names (one per line; default: the dataset's own).",
    )
    data.add_argument(
        "--resolution", type=int, default=512,
        help="Side of the square training crops in pixels (the VAE and U-Net must divide it).",
    )
    data.add_argument(
        "--negative_prob", type=float, default=0.1,
        help="Share of queries for a class absent from the image (target: the empty mask).",
    )
    data.add_argument(
        "--dataloader_num_workers", type=int, default=0,
        help="Data-loading worker processes (0: load in the training process).",
    )
    data.add_argument(
        "--scale_range", type=float, nargs=2, default=(0.8, 1.2), metavar=("LOW", "HIGH"),
        help="Random scale jitter (method.md: 0.8 1.2); '1 1' turns it off.",
    )
    data.add_argument("--flip_prob", type=float, default=0.5, help="Probability of a horizontal flip.")
    data.add_argument(
        "--cache_latents", action="store_true",
        help="Keep the VAE latents of samples whose crop never changes (no scale jitter, no flip, images already "
        "square at --resolution) for the whole run instead of encoding them every epoch. Costs memory: one image "
        "latent per image and one mask latent per (image, class) seen.",
    )

    train = option_group(parser, "training")
    train.add_argument(
        "--output_dir", required=True, metavar="DIR",
        help="Checkpoints, the adapter, the pipeline and train_summary.json go here. A folder that holds another "
        "run is refused unless --resume_from_checkpoint or --overwrite_output_dir.",
    )
    train.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="Start a new run in an --output_dir that holds another: its checkpoints, adapter, pipeline, summary and "
        "logs are removed first (nothing else in the folder is touched).",
    )
    train.add_argument(
        "--seed", type=int, default=0,
        help="Seed of the weights' initialisation, the data order and every step's noise.",
    )
    train.add_argument("--train_batch_size", type=int, default=2, help="Queries per device and micro-batch.")
    train.add_argument(
        "--gradient_accumulation_steps", type=int, default=1,
        help="Micro-batches per optimizer step (the logged loss is their mean).",
    )
    train.add_argument(
        "--max_train_steps", type=int, default=30000,
        help="Optimizer steps of the whole run (across resumes; raise it on a resume to extend a run).",
    )
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate of AdamW.")
    train.add_argument(
        "--lr_scheduler", default="constant_with_warmup",
        help="diffusers.optimization schedule: constant_with_warmup, cosine, linear, ...",
    )
    train.add_argument("--lr_warmup_steps", type=int, default=500, help="Steps of linear warm-up.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clipping.")
    train.add_argument(
        "--noise_variant", choices=NOISE_VARIANTS, default="multires_annealed",
        help="Training noise (method.md section 3): multi-resolution annealed by default.",
    )
    train.add_argument(
        "--noise_strength", type=float, default=0.9,
        help="Strength of the coarse components of the multi-resolution noise.",
    )
    train.add_argument(
        "--timestep_bias_strategy",
        choices=TIMESTEP_BIAS_STRATEGIES,
        default="none",
        help='"none" draws t ~ U{0..T-1} (the method); "later"/"earlier" weight one end of the schedule more '
        "(the demo model uses \"later\": 1-step inference only ever asks at t = T-1).",
    )
    train.add_argument("--timestep_bias_multiplier", type=float, default=1.0, help="Weight of the biased timesteps.")
    train.add_argument(
        "--timestep_bias_portion", type=float, default=0.25,
        help="Fraction of the timesteps that are biased.",
    )
    train.add_argument(
        "--loss", choices=LOSSES, default="latent",
        help='"latent": the method\'s denoising loss at sampled timesteps; "e2e": the end-to-end task loss (every row '
        "at t = T-1, the x0 estimate decoded with gradients through the decoder, BCE + soft Dice against the mask); "
        '"latent+e2e": both on the same prediction (digseg_diffusers.training.step).',
    )
    train.add_argument(
        "--prompts_per_image", type=int, default=1,
        help="K > 1: each image's visible classes plus sampled absent ones as K queries of one batch, with a per-pixel "
        "cross-entropy over the K decoded maps plus background (the argmax inference takes). --train_batch_size "
        "counts queries and must be a multiple of K.",
    )
    train.add_argument("--e2e_weight", type=float, default=1.0, help="Weight of the task loss (BCE + Dice).")
    train.add_argument(
        "--multi_prompt_weight", type=float, default=1.0,
        help="Weight of the multi-prompt cross-entropy.",
    )
    train.add_argument(
        "--e2e_decoder", choices=["auto", "vae", "light"], default="auto",
        help="Decoder of the task / multi-prompt losses: the pipeline's light mask_decoder when it has one ('auto'), "
        "or the VAE decoder. Frozen unless --train_decoder.",
    )
    train.add_argument(
        "--train_decoder", action="store_true",
        help="Co-train that decoder with the task loss (saved in checkpoints and in the saved pipeline).",
    )
    train.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
        help="Frozen weights in fp16 / bf16 with autocast (trainable ones and saved files stay fp32); "
        "default: accelerate's config.",
    )
    train.add_argument(
        "--gradient_checkpointing", action="store_true",
        help="Recompute U-Net activations in the backward pass: less memory, ~30 %% more time.",
    )
    train.add_argument(
        "--checkpointing_steps", type=int, default=500,
        help="Save a resumable checkpoint every N steps (and at the last step).",
    )
    train.add_argument(
        "--checkpoints_total_limit", type=int, default=None,
        help="Keep at most this many checkpoints (older ones removed once the new one is complete; default: all).",
    )
    train.add_argument(
        "--resume_from_checkpoint", default=None, metavar="PATH|latest",
        help='A checkpoint folder (must exist and be complete), or "latest": the newest complete checkpoint in '
        "--output_dir (a new run when the folder holds none; a finished run is left as it is). The checkpoint must "
        "come from a run with the same settings; output, logging, validation, step-count and checkpointing "
        "options may change.",
    )

    report = option_group(parser, "logging, validation and publishing")
    report.add_argument(
        "--report_to", choices=["none", "all", *TRACKER_PACKAGES], default=default_tracker(),
        help='Experiment tracker; "all": every installed one. The default is tensorboard when it is installed, '
        'else "none" (default here: %(default)s).',
    )
    report.add_argument("--logging_dir", default="logs", help="TensorBoard / tracker logs, under --output_dir.")
    report.add_argument(
        "--validation_steps", type=int, default=1000,
        help="Validate on --validation_split every N steps.",
    )
    report.add_argument(
        "--num_validation_images", type=int, default=4,
        help="Images of the validation split scored each time (the first N).",
    )
    report.add_argument(
        "--validation_inference_steps", type=int, default=1,
        help="Denoising steps of the validation segmentation.",
    )
    report.add_argument(
        "--validation_resolution", type=int, default=None,
        help="Processing resolution (default: --resolution).",
    )
    report.add_argument(
        "--save_pipeline", action="store_true",
        help="Also save the whole trained pipeline (needed for 'full' mode models that ship on their own).",
    )
    report.add_argument(
        "--push_to_hub", action="store_true",
        help="Upload the adapter with its model card to --hub_model_id at the end (needs network).",
    )
    report.add_argument(
        "--hub_model_id", default=None,
        help="Hub repo id for --push_to_hub (e.g. 'user/digseg-ade20k').",
    )
    report.add_argument(
        "--hub_token", default=None,
        help="Hub token (default: the cached login); never written to logs or cards.",
    )
    report.add_argument("--dataset_name", default=None, help="Dataset id for the model card (e.g. 'ade20k').")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.pretrained_model_name_or_path) == bool(args.base_model):
        parser.error("give exactly one of --pretrained_model_name_or_path (DiGSeg) or --base_model (Stable Diffusion)")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir starts a new run: it cannot be combined with --resume_from_checkpoint")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if not 0.0 < args.scale_range[0] <= args.scale_range[1]:
        parser.error(f"--scale_range must be LOW HIGH with 0 < LOW <= HIGH, got {args.scale_range}")
    if not 0.0 <= args.flip_prob <= 1.0:
        parser.error(f"--flip_prob must be in [0, 1], got {args.flip_prob}")
    if args.prompts_per_image < 1 or args.train_batch_size % args.prompts_per_image:
        parser.error(
            f"--train_batch_size ({args.train_batch_size}) must be a multiple of --prompts_per_image "
            f"({args.prompts_per_image}): a batch holds whole images"
        )
    if args.e2e_weight < 0 or args.multi_prompt_weight < 0:
        parser.error("--e2e_weight and --multi_prompt_weight must be non-negative")
    if args.train_decoder and args.loss == "latent" and args.prompts_per_image == 1:
        parser.error("--train_decoder needs a loss that decodes: --loss e2e / latent+e2e or --prompts_per_image > 1")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps", "validation_steps", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    from digseg_diffusers.noise import check_timestep_bias  # imports torch: after the cheap checks

    try:
        check_timestep_bias(args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_portion)
    except ValueError as error:
        parser.error(f"--timestep_bias_*: {error}")
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """The run's settings as its checkpoints record them: every public option (never the Hub token), local inputs
    as absolute paths."""
    from digseg_diffusers.hub.cards import public_training_config

    settings = public_training_config(vars(args))
    for name in LOCAL_INPUTS:
        value = settings.get(name)
        if value and os.path.exists(value):
            settings[name] = os.path.abspath(value)
    return settings


def choose_resume_checkpoint(args: argparse.Namespace, settings: dict) -> Path | None:
    """The checkpoint to resume from (None: a new run), after checking that --output_dir holds no other run.

    Reads only: nothing is written or removed here (`--overwrite_output_dir` clears the folder later, on the main
    process). A checkpoint recorded with other settings is refused with the differing ones named.
    """
    output_dir = Path(args.output_dir)
    earlier = previous_run(output_dir, RUN_OUTPUTS)
    found = ", ".join(path.name for path in earlier)
    if args.overwrite_output_dir:
        return None
    if not args.resume_from_checkpoint:
        if earlier:
            fail(
                f"--output_dir {output_dir} holds another run ({found}): continue it with --resume_from_checkpoint "
                "latest, replace it with --overwrite_output_dir, or choose another --output_dir"
            )
        return None
    try:
        resume_path = resolve_resume_checkpoint(
            args.resume_from_checkpoint, output_dir, warn=lambda message: note(message, logging.WARNING)
        )
    except CheckpointError as error:
        fail(str(error))
    if resume_path is None:
        if earlier:
            fail(
                f"--resume_from_checkpoint latest: --output_dir {output_dir} holds a run ({found}) but no complete "
                "checkpoint of it: replace it with --overwrite_output_dir, or choose another --output_dir"
            )
        note(f"No checkpoint in {output_dir}; starting a new run.")
        return None
    if earlier and resume_path.resolve().parent != output_dir.resolve():
        fail(
            f"--output_dir {output_dir} holds another run ({found}): resume {resume_path} into an empty "
            "--output_dir, or resume a checkpoint of the run in it"
        )
    recorded = checkpoint_settings(resume_path)
    if recorded is None:
        note(f"{resume_path} records no run settings (saved by an older version): resuming without checking that "
             "they match this command's.", logging.WARNING)
        return resume_path
    differences = settings_differences(recorded, settings, SETTINGS_THAT_MAY_CHANGE_ON_RESUME)
    if differences:
        fail(
            f"--resume_from_checkpoint: {resume_path} belongs to a run with other settings ({'; '.join(differences)}): "
            "resume with the checkpoint's values, or start a new run (another --output_dir, or --overwrite_output_dir)"
        )
    return resume_path


def check_inputs(args: argparse.Namespace):
    """Read the dataset's index and class names and check that each model can be had, before any model loads.

    Returns (training reader, validation reader or None). A Hub id that is neither cached nor reachable fails at once
    (`hub.files.require_hub_source`) instead of after huggingface_hub's retries.
    """
    from digseg_diffusers.data import build_reader
    from digseg_diffusers.data.readers import read_class_names_file
    from digseg_diffusers.hub.files import require_hub_source

    reader_kwargs = {}
    if args.class_names_file:
        try:
            reader_kwargs["class_names"] = read_class_names_file(args.class_names_file)
        except (OSError, ValueError) as error:
            fail(f"--class_names_file: {error}")

    def read_split(split: str | None, option: str):
        try:
            return build_reader(args.dataset_format, args.train_data_dir, split, **reader_kwargs)
        except (OSError, ValueError) as error:
            fail(f"{option}: {error}")

    train_reader = read_split(args.train_split, "--train_data_dir")
    validation_reader = None
    if args.validation_split:
        validation_reader = read_split(args.validation_split, f"--validation_split {args.validation_split}")
    models = {
        "pretrained_model_name_or_path": "the DiGSeg pipeline",
        "base_model": "the base model",
        "text_encoder": "the text encoder",
        "resume_adapter": "the adapter",
    }
    for option, what in models.items():
        if getattr(args, option):
            try:
                require_hub_source(getattr(args, option), what)
            except OSError as error:
                fail(f"--{option}: {error}")
    return train_reader, validation_reader


def load_pipeline(args: argparse.Namespace):
    """The pipeline to train: an existing DiGSeg model, or a fresh one built from an SD base (+ text encoder)."""
    from digseg_diffusers import DiGSegPipeline

    if args.pretrained_model_name_or_path:
        return DiGSegPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    return DiGSegPipeline.from_base_model(args.base_model, text_encoder=args.text_encoder, revision=args.revision)


def finished_summary(args: argparse.Namespace, step: int) -> dict | None:
    """The summary of a run whose final outputs for `step` are all written (None if any is missing).

    train_summary.json is written last, after the adapter and pipeline folders are in place.
    """
    summary_path = Path(args.output_dir) / SUMMARY_NAME
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    outputs = [ADAPTER_SUBFOLDER] + ([PIPELINE_SUBFOLDER] if args.save_pipeline or args.train_entire_unet else [])
    if summary.get("global_step") != step or not all((Path(args.output_dir) / name).is_dir() for name in outputs):
        return None
    return summary


def cast_frozen_parameters(modules: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """Store the parameters that do not train in `dtype`; trainable ones keep their (fp32) values exactly."""
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)


def select_task_decoder(args: argparse.Namespace, pipeline, loss_config: TrainingLossConfig):
    """The light decoder the task / multi-prompt losses decode with (None: the VAE decoder), and the decoder
    parameters that train (empty unless --train_decoder)."""
    light = getattr(pipeline, "mask_decoder", None)
    if args.e2e_decoder == "light" and light is None:
        raise SystemExit("train_adapter.py: error: --e2e_decoder light needs a pipeline with a mask_decoder component")
    if light is not None:
        light.requires_grad_(False)
    decoder = None if args.e2e_decoder == "vae" else light
    if not (loss_config.needs_decoder and args.train_decoder):
        return decoder, []
    parts = [decoder] if decoder is not None else [pipeline.vae.post_quant_conv, pipeline.vae.decoder]
    for part in parts:
        part.requires_grad_(True)
    return decoder, [param for part in parts for param in part.parameters()]


def trained_decoder_state(pipeline, light_decoder, keep_vars: bool = False) -> dict:
    """State of the co-trained decoder: the light decoder's, or the VAE's decoder side (post_quant_conv + decoder)."""
    if light_decoder is not None:
        return light_decoder.state_dict(keep_vars=keep_vars)
    return {
        name: tensor
        for name, tensor in pipeline.vae.state_dict(keep_vars=keep_vars).items()
        if name.startswith(("decoder.", "post_quant_conv."))
    }


def main(argv: list[str] | None = None) -> dict:
    """Check the command, the output folder and every input (reading only, no model loaded), then train."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = parse_args(argv)
    settings = run_settings(args)
    resume_path = choose_resume_checkpoint(args, settings)
    train_reader, validation_reader = check_inputs(args)
    return train(args, settings, resume_path, train_reader, validation_reader)


logger = None  # accelerate's multi-process logger, made by `train` (accelerate imports torch)


def train(args: argparse.Namespace, settings: dict, resume_path: Path | None, train_reader, validation_reader) -> dict:
    """The training run; returns the summary (also written to train_summary.json)."""
    global logger
    from dataclasses import fields

    import torch
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from digseg_diffusers.adapter import DiGSegAdapterConfig, apply_adapter, load_adapter, save_adapter
    from digseg_diffusers.data import SegmentationTrainingDataset, augmentation_is_random, collate_segmentation_batch
    from digseg_diffusers.hub.cards import public_training_config
    from digseg_diffusers.training.step import (
        LatentCache,
        TrainingLoss,
        TrainingLossConfig,
        batch_seed,
        compute_batch_loss,
    )

    logger = get_logger(__name__, log_level="INFO")
    log_with = None if args.report_to == "none" else args.report_to
    if log_with not in (None, "all") and log_with not in installed_trackers():
        note(f"--report_to {log_with}: {' or '.join(TRACKER_PACKAGES[log_with])} is not installed, so nothing is "
             f"tracked (pip install {TRACKER_PACKAGES[log_with][0]}, or pass --report_to none).", logging.WARNING)
        log_with = None

    # Accelerator: one object for every launch mode (CPU, processes, GPUs, machines).
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # Each epoch's shuffle is a function of (seed, epoch), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            logs = [args.logging_dir] if not os.path.isabs(args.logging_dir) else []
            removed = clear_previous_run(args.output_dir, RUN_OUTPUTS + tuple(logs))
            if removed:
                logger.info(f"--overwrite_output_dir: removed the previous run's {', '.join(p.name for p in removed)}")
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    resume_step = saved_step(resume_path) if resume_path is not None else 0
    if resume_path is not None and resume_step >= args.max_train_steps:
        summary = finished_summary(args, resume_step)
        if summary is not None:
            logger.info(
                f"{resume_path} is at step {resume_step} (--max_train_steps {args.max_train_steps}) and the run's "
                f"outputs are written: nothing to do."
            )
            if args.push_to_hub and accelerator.is_main_process:  # the one step that may have failed (network)
                push_adapter(args)
            accelerator.end_training()
            return summary
        logger.info(f"{resume_path} is the run's last step ({resume_step}): writing its final outputs without training.")

    # Models: frozen VAE and text encoder; the adapter's parts of the U-Net and the text projection train.
    pipeline = load_pipeline(args)
    pipeline.set_progress_bar_config(disable=True)
    unet, vae, text_encoder, text_projection = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_projection
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    base_model = args.base_model or pipeline.config.base_model or args.pretrained_model_name_or_path
    adapter_config = DiGSegAdapterConfig(
        mode=args.adapter_mode,
        levels=tuple(args.levels) if args.levels else None,
        rank=args.rank,
        alpha=args.lora_alpha,
        include_mid_block=not args.no_mid_block,
        train_conv_in=not args.no_conv_in,
        base_model=base_model,
    )
    apply_adapter(unet, text_projection, adapter_config)
    if args.resume_adapter:
        adapter_config = load_adapter(unet, text_projection, args.resume_adapter, is_trainable=True)
    if args.train_entire_unet:
        unet.requires_grad_(True)
        args.save_pipeline = True
    trainable_params = [p for p in list(unet.parameters()) + list(text_projection.parameters()) if p.requires_grad]
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device)  # its frozen parameters go to weight_dtype below, once the decoder's role is known
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)  # the base model's betas and target
    # Every field but the threshold is the option of the same name; the threshold is the pipeline's own.
    loss_options = {f.name: getattr(args, f.name) for f in fields(TrainingLossConfig) if hasattr(args, f.name)}
    loss_config = TrainingLossConfig(**loss_options, mask_threshold=float(pipeline.config.default_mask_threshold))
    e2e_mask_decoder, decoder_params = select_task_decoder(args, pipeline, loss_config)
    trainable_params += decoder_params
    if e2e_mask_decoder is not None:
        e2e_mask_decoder.to(accelerator.device)
    if weight_dtype != torch.float32:
        # Under fp16 / bf16 the frozen weights are stored in that dtype (half the memory, as in diffusers' LoRA
        # scripts) and accelerate's autocast runs the forward pass; what trains stays fp32, for the optimizer's
        # updates. Only frozen parameters are cast (diffusers' `cast_training_params` would instead round the
        # already-initialised trainable weights, conv_in among them, through the half dtype and back).
        cast_frozen_parameters([unet, vae, text_projection] + ([e2e_mask_decoder] if e2e_mask_decoder is not None else []), weight_dtype)
    logger.info(
        f"Trainable parameters: {sum(p.numel() for p in trainable_params):,} of "
        f"{sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in text_projection.parameters()):,} "
        f"(adapter mode {adapter_config.mode}, prediction type {noise_scheduler.config.prediction_type})"
    )

    # Checkpoints hold only what trains: the adapter files, written by these hooks, plus accelerate's states.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_adapter(os.path.join(output_dir, ADAPTER_SUBFOLDER), unet, text_projection, adapter_config)
            if args.train_entire_unet:
                save_file(accelerator.unwrap_model(unet).state_dict(), os.path.join(output_dir, ENTIRE_UNET_WEIGHTS))
            if decoder_params:
                save_file(trained_decoder_state(pipeline, e2e_mask_decoder), os.path.join(output_dir, DECODER_WEIGHTS))
        weights.clear()

    @torch.no_grad()
    def copy_in_place(tensors: dict, path: str) -> None:  # in place: the optimizer and DDP hold these very tensors
        state = load_file(path)
        for name, tensor in tensors.items():
            tensor.copy_(state[name])

    def load_model_hook(models, input_dir):
        if args.train_entire_unet:
            unet_state = accelerator.unwrap_model(unet).state_dict(keep_vars=True)
            copy_in_place(unet_state, os.path.join(input_dir, ENTIRE_UNET_WEIGHTS))
        load_adapter(unet, text_projection, os.path.join(input_dir, ADAPTER_SUBFOLDER), is_trainable=True)
        if args.train_entire_unet:
            accelerator.unwrap_model(unet).requires_grad_(True)
        if decoder_params:
            decoder_state = trained_decoder_state(pipeline, e2e_mask_decoder, keep_vars=True)
            copy_in_place(decoder_state, os.path.join(input_dir, DECODER_WEIGHTS))
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # Data (the readers were built by `check_inputs`).
    train_dataset = SegmentationTrainingDataset(
        train_reader,
        resolution=args.resolution,
        negative_prob=args.negative_prob,
        scale_range=tuple(args.scale_range),
        flip_prob=args.flip_prob,
        seed=args.seed,
        prompts_per_image=args.prompts_per_image,
    )
    latent_cache = LatentCache() if args.cache_latents else None
    if args.cache_latents and augmentation_is_random(args.scale_range, args.flip_prob):
        logger.warning("--cache_latents: every crop is random (scale jitter or flips), so nothing will be cached; "
                       "add --scale_range 1 1 --flip_prob 0 to cache.")
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size // args.prompts_per_image,  # images; each gives K query rows
        shuffle=True,
        collate_fn=collate_segmentation_batch,
        num_workers=args.dataloader_num_workers,
        drop_last=len(train_dataset) >= args.train_batch_size // args.prompts_per_image * accelerator.num_processes,
    )
    with torch.no_grad():  # the text encoder is frozen: each class name is encoded once for the whole run
        class_token_states = pipeline.encode_text_states(train_dataset.class_names).to(accelerator.device, weight_dtype)

    # Optimizer and learning-rate schedule.
    optimizer = torch.optim.AdamW(
        trainable_params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, text_projection, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, text_projection, optimizer, train_dataloader, lr_scheduler
    )
    num_update_steps_per_epoch = max(1, math.ceil(len(train_dataloader) / args.gradient_accumulation_steps))
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if args.report_to != "none":
        # Never `vars(args)` itself: `--hub_token` would land in TensorBoard's hparams / wandb's config.
        accelerator.init_trackers("digseg-adapter", config=public_training_config(vars(args), scalars_only=True))

    # Resume: weights, optimizer, scheduler and RNG states, and the record of the steps already done.
    global_step, first_epoch = 0, 0
    record = TrainingRecord()
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = resume_step
        first_epoch = global_step // num_update_steps_per_epoch
        record.load_state_dict(read_training_state(resume_path))
        saved_processes = len(list(resume_path.glob("random_states_*.pkl")))
        if saved_processes and saved_processes != accelerator.num_processes:
            logger.warning(f"{resume_path} was saved by {saved_processes} processes, resumed with "
                           f"{accelerator.num_processes}: the run continues, but not as an exact replay.")

    # Train.
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training: {len(train_dataset)} examples, {args.max_train_steps} steps, batch {total_batch_size} "
        f"({args.train_batch_size} per device x {accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation) *****"
    )
    batches_seen = global_step * args.gradient_accumulation_steps
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, num_train_epochs if global_step < args.max_train_steps else first_epoch):
        train_dataset.set_epoch(epoch)  # augmentation of epoch `epoch`
        unet.train()
        text_projection.train()
        steps_done_in_epoch = global_step - epoch * num_update_steps_per_epoch
        batches = train_dataloader
        if steps_done_in_epoch > 0:  # resuming mid-epoch: skip the batches already trained on
            batches = accelerator.skip_first_batches(train_dataloader, steps_done_in_epoch * args.gradient_accumulation_steps)
        if hasattr(batches, "set_epoch"):  # shuffle of epoch `epoch`, also right after a resume
            batches.set_epoch(epoch)
        micro_batch_losses: list[TrainingLoss] = []  # of the current optimizer step (gradient accumulation)
        for batch in batches:
            with accelerator.accumulate(unet, text_projection):
                step_loss_parts = compute_batch_loss(
                    unet, text_projection, noise_scheduler, vae, batch, class_token_states, loss_config,
                    seed=batch_seed(args.seed, accelerator.process_index, batches_seen), latent_cache=latent_cache,
                    mask_decoder=e2e_mask_decoder, autocast=accelerator.autocast,  # fp16 / bf16 frozen, fp32 trainable
                )
                batches_seen += 1
                micro_batch_losses.append(step_loss_parts)

                accelerator.backward(step_loss_parts.loss)
                if accelerator.sync_gradients:
                    # The decoder is not wrapped for distributed training: average its gradients here.
                    if decoder_params and accelerator.num_processes > 1:
                        for param in decoder_params:
                            if param.grad is not None:
                                param.grad = accelerator.reduce(param.grad, reduction="mean")
                    accelerator.clip_grad_norm_(trainable_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            record.add_skipped(batch["skipped_paths"])
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            # The step's loss: the mean over its micro-batches (what the accumulated gradient is of) and processes.
            step_loss = torch.stack([part.loss.detach().float() for part in micro_batch_losses]).mean()
            step_loss = accelerator.gather(step_loss.reshape(1)).mean().item()
            record.losses.append([global_step, step_loss])
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "skipped_files": len(record.skipped_paths)}
            for name in micro_batch_losses[0].parts:
                logs[f"loss/{name}"] = sum(part.parts[name] for part in micro_batch_losses) / len(micro_batch_losses)
            micro_batch_losses = []
            progress_bar.set_postfix(loss=f"{step_loss:.4f}")
            accelerator.log(logs, step=global_step)

            if validation_reader is not None and (global_step % args.validation_steps == 0 or global_step == args.max_train_steps):
                metrics = run_validation(args, accelerator, pipeline, validation_reader, unet, text_projection)
                if metrics is not None:
                    record.validation.append({"step": global_step, **metrics})
                    accelerator.log({"val/mIoU": metrics["mIoU"], "val/pixel_accuracy": metrics["pixel_accuracy"]}, step=global_step)

            # After validation, so the checkpoint holds the state the run continues from (and the step's metrics).
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                record.synchronize(accelerator)
                try:
                    save_checkpoint(
                        accelerator, args.output_dir, global_step, record.state_dict(), args.checkpoints_total_limit,
                        settings=settings,
                    )  # fmt: skip
                except DiskFullError as error:
                    fail(disk_full_advice(args, error), code=1, every_process=True)

            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    if latent_cache is not None:
        logger.info(f"Latent cache: {latent_cache.reused} latents reused, {latent_cache.encoded} encoded "
                    f"({len(latent_cache.image_latents)} images and {len(latent_cache.mask_latents)} masks kept)")

    # Save the adapter with its model card (and optionally the whole pipeline), then the run summary. Each folder
    # is built under a temporary name and renamed into place; the summary, written last, marks the run finished.
    record.synchronize(accelerator)
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        unet_trained = accelerator.unwrap_model(unet)
        projection_trained = accelerator.unwrap_model(text_projection)
        adapter_dir = os.path.join(args.output_dir, ADAPTER_SUBFOLDER)
        pipeline_dir = os.path.join(args.output_dir, PIPELINE_SUBFOLDER)
        summary_path = os.path.join(args.output_dir, SUMMARY_NAME)
        losses = record.losses
        summary = {
            "global_step": global_step,
            "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None,
            "losses": losses,
            "validation": record.validation,
            "skipped_files": len(record.skipped_paths),
            "skipped_paths": sorted(record.skipped_paths),
            "num_processes": accelerator.num_processes,
            "adapter": adapter_config.to_dict(),
        }
        try:
            with (
                reporting_full_disk(adapter_dir, f"the adapter {adapter_dir}"),
                staged_directory(adapter_dir) as staging,
            ):
                save_adapter(staging, unet_trained, projection_trained, adapter_config)
                write_card(args, staging, adapter_config, train_dataset.class_names, record.validation)
            if args.save_pipeline:
                for module in (unet_trained, vae, text_encoder):  # a saved pipeline is fp32 whatever the training dtype
                    module.to(torch.float32)
                with (
                    reporting_full_disk(pipeline_dir, f"the pipeline {pipeline_dir}"),
                    staged_directory(pipeline_dir) as staging,
                ):
                    save_trained_pipeline(pipeline, unet_trained, projection_trained, adapter_config, staging)
            with reporting_full_disk(summary_path, summary_path):
                atomic_write_json(summary_path, summary)
        except DiskFullError as error:
            fail(disk_full_advice(args, error), code=1, every_process=True)
        if args.push_to_hub:  # after everything is saved locally: a network error loses nothing
            push_adapter(args)
    # Every process tears the process group down together: one leaving while the main one still writes the outputs
    # was seen to abort (gloo, "terminate called without an active exception") on a loaded 2-core machine.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def disk_full_advice(args: argparse.Namespace, error: DiskFullError) -> str:
    """The one line for a full disk: what failed, what is kept, how to go on."""
    latest = find_latest_checkpoint(args.output_dir, warn=lambda message: None)
    if latest is None:
        return f"{error}. No checkpoint was complete yet: free some space (or choose another --output_dir), run again"
    return (
        f"{error}. Everything written before is kept (newest complete checkpoint: {latest.name}): free some space, "
        "then rerun the same command with --resume_from_checkpoint latest"
    )


def save_trained_pipeline(pipeline, unet, text_projection, adapter_config, path: str) -> None:
    """Save a standalone pipeline: LoRA merged into the weights (or full weights), loadable with from_pretrained."""
    from digseg_diffusers.adapter import merge_and_unload_adapter

    merge_and_unload_adapter(unet)
    pipeline.register_modules(unet=unet, text_projection=text_projection)
    pipeline.save_pretrained(path)


def run_validation(args, accelerator, pipeline, reader, unet, text_projection) -> dict | None:
    """mIoU of the current weights on the first `--num_validation_images` validation images (main process)."""
    if not accelerator.is_main_process:
        return None
    import torch

    from digseg_diffusers.evaluation.runner import evaluate_examples

    with torch.no_grad():
        unet_eval, projection_eval = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_projection)
        was_training = unet_eval.training
        unet_eval.eval()
        projection_eval.eval()
        pipeline.register_modules(unet=unet_eval, text_projection=projection_eval)
        pipeline.clear_prompt_cache()  # the projection trained since the last validation (fused optimizers leave no trace)
        examples = (reader.load_validation_example(i) for i in range(min(args.num_validation_images, len(reader))))
        with accelerator.autocast():  # the frozen weights are fp16 / bf16 under --mixed_precision
            confusion = evaluate_examples(
                pipeline,
                examples,
                reader.class_names,
                ignore_index=reader.ignore_index,
                num_inference_steps=args.validation_inference_steps,
                processing_resolution=args.validation_resolution or args.resolution,
            )
        metrics = confusion.compute()
        logger.info(f"validation mIoU {metrics['mIoU']:.4f}, pixel accuracy {metrics['pixel_accuracy']:.4f}")
        if was_training:
            unet_eval.train()
            projection_eval.train()
        return {"mIoU": metrics["mIoU"], "pixel_accuracy": metrics["pixel_accuracy"]}


def push_adapter(args: argparse.Namespace) -> None:
    """Upload the saved adapter folder (needs network)."""
    from digseg_diffusers.hub.cards import push_folder_to_hub

    push_folder_to_hub(os.path.join(args.output_dir, ADAPTER_SUBFOLDER), args.hub_model_id, token=args.hub_token)


def write_card(args, adapter_dir: str | os.PathLike, adapter_config, class_names, validation_history) -> None:
    """Write the model card next to the adapter."""
    from digseg_diffusers.hub.cards import public_training_config, write_adapter_card

    metrics = validation_history[-1] if validation_history else None
    write_adapter_card(
        adapter_dir,
        base_model=adapter_config.base_model,
        repo_id=args.hub_model_id,
        dataset_name=args.dataset_name or args.dataset_format,
        class_names=class_names,
        metrics=metrics,
        training_args=public_training_config(vars(args)),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
