#!/usr/bin/env python
"""Round-trip segmentation masks through a VAE and report how much it loses (the paper's Table 7).

    python training/vae_mask_study.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2 \
        --subfolder vae --data_dir ADEChallengeData2016 --dataset_format ade20k --split validation \
        --num_masks 1000 --resolution 512 --output vae_study.json

``--dataset_format`` ade20k / coco_stuff / cityscapes / pascal_context / folder reads label maps through the
project's dataset readers; ``label_maps`` (the default) takes any folder of single-channel label images. Without
``--data_dir`` the masks are random ellipses and rectangles. The measuring code lives in
``digseg_diffusers.evaluation.vae_study``; this script only parses arguments, prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys

import numpy as np
import torch

from digseg_diffusers.data.readers import BACKGROUND_INDEX, READERS, build_reader
from digseg_diffusers.evaluation.metrics import to_jsonable
from digseg_diffusers.evaluation.vae_study import (
    format_markdown_table,
    generate_random_masks,
    load_vae,
    masks_from_label_maps,
    read_label_maps,
    vae_mask_roundtrip,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
logger = logging.getLogger(__name__)


def reader_label_maps(reader, seed: int):
    """Class-index label maps of a reader's examples in a seeded random order; unreadable files are skipped."""
    for index in np.random.default_rng(seed).permutation(len(reader)).tolist():
        try:
            yield reader.load_label(index)
        except (OSError, ValueError) as error:
            logger.warning(f"skipping {reader[index].label_path}: {error}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="VAE folder or hub id (or a pipeline).")
    parser.add_argument("--subfolder", default=None, help="e.g. 'vae' for a Stable Diffusion repository.")
    parser.add_argument("--data_dir", default=None, help="Dataset root (see --dataset_format); random shapes if unset.")
    parser.add_argument(
        "--dataset_format",
        choices=["label_maps", *sorted(READERS)],
        default="label_maps",
        help="'label_maps': any folder of single-channel label images (raw values, see --ignore_labels); otherwise "
        "the project's reader of that layout (class indices; background and ignored pixels are never drawn).",
    )
    parser.add_argument("--split", default=None, help="Split for a dataset reader (its default if unset).")
    parser.add_argument(
        "--ignore_labels", type=int, nargs="*", default=[255], help="Raw values never drawn ('label_maps' only)."
    )
    parser.add_argument("--num_masks", type=int, default=100, help="Masks to round-trip (the paper uses 1000).")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.5, help="Binarisation threshold for the IoU.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--output", default=None, help="Write the report as JSON here.")
    args = parser.parse_args(argv)
    for name in ("num_masks", "resolution", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    vae = load_vae(args.pretrained_model_name_or_path, subfolder=args.subfolder, torch_dtype=DTYPES[args.dtype])
    vae.to(args.device)
    if args.data_dir:
        if args.dataset_format == "label_maps":
            label_maps = (label_map for _, label_map in read_label_maps(args.data_dir))
            ignore_labels = args.ignore_labels
        else:
            reader = build_reader(args.dataset_format, args.data_dir, split=args.split)
            label_maps = reader_label_maps(reader, seed=args.seed)
            ignore_labels = (reader.ignore_index, BACKGROUND_INDEX)
        masks = masks_from_label_maps(
            itertools.islice(label_maps, 20 * args.num_masks), args.num_masks, args.resolution,
            ignore_labels=ignore_labels, seed=args.seed,
        )  # fmt: skip
        source = args.data_dir
    else:
        masks = generate_random_masks(args.num_masks, args.resolution, args.resolution, seed=args.seed)
        source = "random shapes"
    report = vae_mask_roundtrip(vae, masks, batch_size=args.batch_size, threshold=args.threshold)
    report.update(
        vae=str(args.pretrained_model_name_or_path),
        subfolder=args.subfolder,
        vae_class=type(vae).__name__,
        data=source,
        dtype=args.dtype,
    )
    label = f"{args.pretrained_model_name_or_path}{'/' + args.subfolder if args.subfolder else ''} ({source})"
    print(format_markdown_table([(label, report)]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(to_jsonable(report), f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
