"""`training/train_adapter.py` end to end: 2 accelerate processes on CPU, resume, the trained adapter, the card."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.hub.cards import read_card_metadata
from digseg_diffusers.data.synthetic import write_dataset
from digseg_diffusers.testing_utils import CROSS_PATH_ATOL, make_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_adapter.py"
STEPS = 60


def launch(args: list[str], num_processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` with several CPU processes (accelerate's --cpu flag alone starts only one)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)] + args
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_dataset(root / "data", "train", num_images=16, size=64)
    write_dataset(root / "data", "val", num_images=2, size=64)
    make_tiny_pipeline().save_pretrained(root / "base")
    common = [
        "--pretrained_model_name_or_path", str(root / "base"), "--train_data_dir", str(root / "data"),
        "--resolution", "64", "--train_batch_size", "4", "--learning_rate", "2e-3", "--rank", "16",
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "0", "--output_dir", str(root / "out"), "--report_to", "none",
        "--checkpointing_steps", "15", "--validation_split", "val", "--validation_steps", str(STEPS),
        "--num_validation_images", "2", "--dataset_name", "synthetic-shapes",
    ]  # fmt: skip
    first = launch(common + ["--max_train_steps", str(STEPS)])
    assert first.returncode == 0, first.stderr[-3000:]
    first_summary = json.loads((root / "out" / "train_summary.json").read_text())
    second = launch(common + ["--max_train_steps", str(STEPS + 4), "--resume_from_checkpoint", "latest"])
    assert second.returncode == 0, second.stderr[-3000:]
    second_summary = json.loads((root / "out" / "train_summary.json").read_text())
    # Step 45 is mid-epoch (16 examples, 8 per step): resume from it into a fresh folder.
    replay = [a for a in common if a != str(root / "out")]
    replay[replay.index("--output_dir") + 1 : replay.index("--output_dir") + 1] = [str(root / "replay")]
    third = launch(replay + ["--max_train_steps", str(STEPS), "--resume_from_checkpoint", str(root / "out" / "checkpoint-45")])
    assert third.returncode == 0, third.stderr[-3000:]
    replay_summary = json.loads((root / "replay" / "train_summary.json").read_text())
    return root, first_summary, second_summary, replay_summary


@pytest.mark.slow
def test_two_process_training_lowers_the_loss_and_checkpoints(trained):
    root, summary, _, _ = trained
    assert summary["num_processes"] == 2 and summary["global_step"] == STEPS
    losses = [loss for _, loss in summary["losses"]]
    assert [step for step, _ in summary["losses"]] == list(range(1, STEPS + 1))
    assert statistics.mean(losses[-15:]) < 0.9 * statistics.mean(losses[:15])  # measured: 0.43 -> 0.35
    for step in (15, 30, 45, 60):
        assert (root / "out" / f"checkpoint-{step}" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        assert (root / "out" / f"checkpoint-{step}" / "optimizer.bin").is_file()
    assert summary["validation"] and 0.0 <= summary["validation"][-1]["mIoU"] <= 1.0


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(trained):
    root, first, resumed, _ = trained
    # The summary covers the whole run: the first run's losses (from the checkpoint) and the 4 new steps; the
    # finished steps were not redone.
    assert [step for step, _ in resumed["losses"]] == list(range(1, STEPS + 5))
    assert resumed["losses"][:STEPS] == first["losses"]
    assert resumed["global_step"] == STEPS + 4
    assert resumed["validation"][: len(first["validation"])] == first["validation"]
    # The optimizer state came back: AdamW's step counter continues from the checkpoint instead of restarting.
    state = torch.load(root / "out" / f"checkpoint-{STEPS + 4}" / "optimizer.bin", weights_only=True)
    steps = {int(s["step"]) for s in state["state"].values()}
    assert steps == {STEPS + 4}


@pytest.mark.slow
def test_resume_mid_epoch_replays_the_interrupted_run_exactly(trained):
    """Same batches, timesteps, noise, weights and optimizer state: the losses match bit for bit."""
    _, uninterrupted, _, replay = trained
    # Steps 1-45 come from the checkpoint's record, 46-60 were trained again.
    assert [step for step, _ in replay["losses"]] == list(range(1, STEPS + 1))
    assert replay["losses"] == uninterrupted["losses"]


@pytest.mark.slow
def test_trained_adapter_changes_outputs_and_leaves_frozen_weights(trained):
    root, _, _, _ = trained
    base = DiGSegPipeline.from_pretrained(root / "base")
    base.set_progress_bar_config(disable=True)
    adapted = DiGSegPipeline.from_pretrained(root / "base")
    adapted.set_progress_bar_config(disable=True)
    config = adapted.load_digseg_adapter(root / "out" / "adapter")
    image = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    kwargs = dict(processing_resolution=0)
    before = base(image, "circle", generator=torch.Generator().manual_seed(0), **kwargs).probabilities[0]
    after = adapted(image, "circle", generator=torch.Generator().manual_seed(0), **kwargs).probabilities[0]
    assert np.abs(before - after).max() > 1e-3

    for name in ("vae", "text_encoder"):
        for (key, a), (_, b) in zip(getattr(base, name).state_dict().items(), getattr(adapted, name).state_dict().items()):
            assert torch.equal(a, b), f"{name}.{key} changed"
    # Every U-Net weight but conv_in is frozen; inside a LoRA-wrapped projection the original is its base layer.
    assert config.mode == "lora"
    adapted_state = adapted.unet.state_dict()
    for key, value in base.unet.state_dict().items():
        if key.startswith("conv_in."):
            continue
        module, _, leaf = key.rpartition(".")
        adapted_key = key if key in adapted_state else f"{module}.base_layer.{leaf}"
        assert torch.equal(adapted_state[adapted_key], value), f"{key} changed"


@pytest.mark.slow
def test_model_card_metadata(trained):
    root, _, _, _ = trained
    card = read_card_metadata(root / "out" / "adapter" / "README.md")
    assert card["library_name"] == "diffusers"
    assert card["pipeline_tag"] == "image-segmentation"
    assert "base_model" not in card  # the base was a local folder: no Hub id to record
    assert card["datasets"] == ["synthetic-shapes"] and "digseg" in card["tags"] and card["license"]
    metrics = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert set(metrics) >= {"mean_iou", "overall_accuracy"}
    assert sorted(os.listdir(root / "out" / "adapter")) == ["README.md", "pytorch_lora_weights.safetensors"]


def test_ignored_pixels_get_no_loss_weight():
    from digseg_diffusers.training.step import latent_loss_weights

    valid = torch.ones(1, 1, 16, 16)
    valid[..., :8, :] = 0.0  # top half ignored
    valid[..., 8:, :4] = 0.0  # and a quarter-cell strip
    weights = latent_loss_weights(valid, (2, 2))
    torch.testing.assert_close(weights, torch.tensor([[[[0.0, 0.0], [0.5, 1.0]]]]))


def test_bad_arguments_fail_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--pretrained_model_name_or_path" in result.stderr


def test_bad_timestep_bias_fails_at_start_up_with_a_message(tmp_path):
    # Checked while parsing (the same check the sampler uses), before any model is loaded.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(tmp_path / "missing"),
         "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path),
         "--timestep_bias_strategy", "later", "--timestep_bias_portion", "1.5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "bias_portion" in result.stderr


def _train_adapter_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_adapter
    finally:
        sys.path.pop(0)
    return train_adapter


def test_latent_cache_reuses_fixed_crops_and_reencodes_random_ones(tmp_path):
    from digseg_diffusers import mask_codec
    from digseg_diffusers.data import FolderReader, SegmentationTrainingDataset, collate_segmentation_batch
    from digseg_diffusers.training.step import LatentCache

    write_dataset(tmp_path, "train", num_images=6, size=64)
    vae = make_tiny_pipeline().vae.eval()
    calls = []
    original_encode = vae.encode
    vae.encode = lambda pixels, *a, **k: calls.append(len(pixels)) or original_encode(pixels, *a, **k)
    cache = LatentCache()
    fixed = SegmentationTrainingDataset(FolderReader(tmp_path), resolution=64, negative_prob=0.5, scale_range=(1.0, 1.0), flip_prob=0.0)
    batch = collate_segmentation_batch([fixed[i] for i in range(6)])
    assert batch["fixed_crop"].all() and batch["is_negative"].any() and not batch["is_negative"].all()
    with torch.no_grad():
        images, masks = cache.encode(vae, batch, "cpu", torch.float32)
        calls.clear()
        fresh_images = mask_codec.encode_pixels(vae, batch["pixel_values"])
        fresh_masks = mask_codec.encode_masks(vae, batch["mask"])
        torch.testing.assert_close(images, fresh_images, atol=CROSS_PATH_ATOL, rtol=1e-4)  # other batch shapes
        torch.testing.assert_close(masks, fresh_masks, atol=CROSS_PATH_ATOL, rtol=1e-4)
        calls.clear()
        fixed.set_epoch(1)  # another epoch draws other classes, but the same pixels: images come from the cache
        again = collate_segmentation_batch([fixed[i] for i in range(6)])
        torch.testing.assert_close(again["pixel_values"], batch["pixel_values"])
        images_again, masks_again = cache.encode(vae, again, "cpu", torch.float32)
    assert torch.equal(images_again, images)

    def present_queries(b):
        return {(i, c) for i, c, negative in zip(b["index"].tolist(), b["class_index"].tolist(), b["is_negative"].tolist()) if not negative}

    new_masks = len(present_queries(again) - present_queries(batch))
    assert calls == ([new_masks] if new_masks else [])  # only masks of (image, class) pairs not seen before
    assert len(cache.image_latents) == 6

    jittered = SegmentationTrainingDataset(FolderReader(tmp_path), resolution=64, negative_prob=0.0)
    random_batch = collate_segmentation_batch([jittered[i] for i in range(3)])
    assert not random_batch["fixed_crop"].any()
    calls.clear()
    with torch.no_grad():
        cache.encode(vae, random_batch, "cpu", torch.float32)
        cache.encode(vae, random_batch, "cpu", torch.float32)
    assert calls == [3, 3, 3, 3] and len(cache.image_latents) == 6  # encoded every time, never stored


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scale_range", "1.2", "0.8"], "--scale_range must be LOW HIGH"),
        (["--scale_range", "0", "1"], "--scale_range must be LOW HIGH"),
        (["--flip_prob", "1.5"], r"--flip_prob must be in \[0, 1\]"),
    ],
)
def test_bad_augmentation_arguments_fail_with_a_message(tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _train_adapter_module().parse_args(
            ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path)] + extra
        )
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
