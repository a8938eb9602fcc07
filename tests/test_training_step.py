"""The library's training step (`digseg_diffusers.training.step`): latent, end-to-end and multi-prompt losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from digseg_diffusers import mask_codec
from digseg_diffusers.data import SegmentationTrainingDataset, build_reader, collate_segmentation_batch
from digseg_diffusers.mask_decoder import DiGSegMaskDecoder
from digseg_diffusers.noise import sample_training_noise, sample_training_timesteps
from digseg_diffusers.data.synthetic import write_dataset
from digseg_diffusers.testing_utils import make_ddim_scheduler, make_tiny_pipeline, make_tiny_unet, make_tiny_vae
from digseg_diffusers.training.step import (
    TrainingLossConfig,
    compute_training_loss,
    decision_logits,
    mask_task_loss,
    multi_prompt_cross_entropy,
    predicted_original_sample,
)

REPO = Path(__file__).resolve().parent.parent


def _ddpm(prediction_type: str = "v_prediction") -> DDPMScheduler:
    return DDPMScheduler.from_config(make_ddim_scheduler(prediction_type).config)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_x0_estimate_is_what_ddim_inference_keeps(prediction_type):
    """At t = T-1 with trailing spacing (1-step inference) the estimate equals DDIM's pred_original_sample."""
    ddim = make_ddim_scheduler(prediction_type)
    ddim.set_timesteps(1)
    t = int(ddim.timesteps[0])
    assert t == ddim.config.num_train_timesteps - 1
    torch.manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = ddim.step(output, t, sample).pred_original_sample
    estimate = predicted_original_sample(_ddpm(prediction_type), output, torch.full((2,), t), sample)
    torch.testing.assert_close(estimate, expected, rtol=1e-4, atol=1e-4)


def test_decision_logits_are_positive_exactly_where_the_pipeline_mask_is_on():
    torch.manual_seed(0)
    vae = make_tiny_vae()
    latents = torch.randn(3, 4, 8, 8) * 2
    with torch.no_grad():
        probabilities = mask_codec.decode_masks(vae, latents)
        for tau in (0.3, 0.7):
            logits = decision_logits(vae, latents, tau)
            away = (probabilities - tau).abs() > 1e-4  # leave pixels on the threshold to rounding
            assert ((logits > 0) == (probabilities > tau))[away].all()
        light = DiGSegMaskDecoder(latent_channels=4, block_out_channels=(8, 8, 8, 8))
        light_probabilities = mask_codec.decode_masks(vae, latents, mask_decoder=light)
        logits = decision_logits(vae, latents, 0.6, mask_decoder=light)
        away = (light_probabilities - 0.6).abs() > 1e-5
        assert ((logits > 0) == (light_probabilities > 0.6))[away].all()


def test_multi_prompt_cross_entropy_scores_the_argmax_decision():
    # One image, K = 2 queries, 1 x 3 pixels: pixel 0 is query 0's, pixel 1 query 1's, pixel 2 background.
    masks = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).reshape(2, 1, 1, 3)
    valid = torch.ones_like(masks)
    right = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0]]).reshape(2, 1, 1, 3)
    swapped = right.flip(0)
    low = multi_prompt_cross_entropy(right, masks, valid, 2)
    high = multi_prompt_cross_entropy(swapped, masks, valid, 2)
    assert low < 0.02 < 1.0 < high
    # Hand computation for pixel 2 alone (both logits -5 vs background 0).
    only_last = torch.zeros_like(valid)
    only_last[..., 2] = 1.0
    expected = -torch.log_softmax(torch.tensor([-5.0, -5.0, 0.0]), dim=0)[2]
    torch.testing.assert_close(multi_prompt_cross_entropy(right, masks, only_last, 2), expected)
    with pytest.raises(ValueError, match="groups"):
        multi_prompt_cross_entropy(right[:1], masks[:1], valid[:1], 2)


def test_mask_task_loss_ignores_invalid_pixels_and_prefers_the_truth():
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2] = 1.0
    valid = torch.ones_like(masks)
    truth = (masks * 2 - 1) * 6
    assert mask_task_loss(truth, masks, valid) < 0.05 < mask_task_loss(-truth, masks, valid)
    valid[..., 2:] = 0.0  # the wrong right half no longer counts
    wrong_on_ignored = truth.clone()
    wrong_on_ignored[..., 2:] = 6.0
    torch.testing.assert_close(mask_task_loss(wrong_on_ignored, masks, valid), mask_task_loss(truth, masks, valid))


def test_latent_loss_matches_the_method_formula():
    """K = 1 latent loss: the draws and the weighted squared error the training script always used."""
    torch.manual_seed(0)
    unet, scheduler = make_tiny_unet(in_channels=8, cross_attention_dim=32), _ddpm()
    image_latents, mask_latents = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    text, valid = torch.randn(2, 5, 32), torch.ones(2, 1, 64, 64)
    valid[0, :, :16] = 0
    config = TrainingLossConfig(timestep_bias_strategy="later", timestep_bias_multiplier=10.0, timestep_bias_portion=0.1)
    with torch.no_grad():
        result = compute_training_loss(unet, scheduler, image_latents, mask_latents, text, torch.zeros_like(valid), valid,
                                       config, generator=torch.Generator().manual_seed(3))
        generator = torch.Generator().manual_seed(3)
        t = sample_training_timesteps(2, 1000, "later", 10.0, 0.1, generator=generator)
        noise = sample_training_noise(mask_latents, t, 1000, generator=generator)
        noisy = scheduler.add_noise(mask_latents, noise, t)
        pred = unet(torch.cat([image_latents, noisy], 1), t, encoder_hidden_states=text).sample
        weights = torch.nn.functional.adaptive_avg_pool2d(valid, (8, 8))
        target = scheduler.get_velocity(mask_latents, noise, t)
        expected = ((pred - target) ** 2 * weights).sum() / (weights.sum() * 4)
    torch.testing.assert_close(result.loss, expected)
    assert set(result.parts) == {"latent"}


def _tiny_problem(rows: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    vae = make_tiny_vae().requires_grad_(False)
    masks = torch.zeros(rows, 1, 64, 64)
    for row in range(rows):
        masks[row, :, 8 * row : 8 * row + 24, 10:40] = 1.0
    masks[1::2] = 0.0  # every other query absent (as in a multi-prompt group)
    with torch.no_grad():
        mask_latents = mask_codec.encode_masks(vae, masks)
    image_latents = torch.randn(rows, 4, 8, 8)
    return vae, masks, mask_latents, image_latents


@pytest.mark.parametrize("loss, prompts", [("e2e", 1), ("latent+e2e", 2), ("latent", 2)])
def test_a_few_steps_lower_the_loss_and_train_only_the_denoiser(loss, prompts):
    vae, masks, mask_latents, image_latents = _tiny_problem()
    unet, scheduler = make_tiny_unet(in_channels=8, cross_attention_dim=32), _ddpm()
    text = torch.randn(4, 5, 32)
    valid = torch.ones_like(masks)
    config = TrainingLossConfig(loss=loss, prompts_per_image=prompts, mask_threshold=0.7)
    vae_before = {k: v.clone() for k, v in vae.state_dict().items()}
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses = []
    for step in range(25):
        result = compute_training_loss(unet, scheduler, image_latents, mask_latents, text, masks, valid, config,
                                       generator=torch.Generator().manual_seed(step % 2), vae=vae)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    expected_parts = {"latent"} if "latent" in loss else set()
    expected_parts |= {"e2e"} if "e2e" in loss else set()
    expected_parts |= {"multi_prompt"} if prompts > 1 else set()
    assert set(result.parts) == expected_parts
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses  # measured: e2e 1.22 -> 1.09 (a random VAE)
    assert all(torch.equal(vae_before[k], v) for k, v in vae.state_dict().items())  # frozen decoder
    assert any(not torch.equal(unet_before[k], v) for k, v in unet.state_dict().items())


def test_task_loss_gradients_reach_a_co_trained_decoder_and_the_unet():
    vae, masks, mask_latents, image_latents = _tiny_problem()
    vae.decoder.requires_grad_(True)
    unet, scheduler = make_tiny_unet(in_channels=8, cross_attention_dim=32), _ddpm()
    result = compute_training_loss(unet, scheduler, image_latents, mask_latents, torch.randn(4, 5, 32), masks,
                                   torch.ones_like(masks), TrainingLossConfig(loss="e2e"), torch.Generator().manual_seed(0), vae=vae)
    result.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.conv_out.parameters())
    assert all(p.grad is None for p in vae.encoder.parameters())
    assert unet.conv_in.weight.grad.abs().sum() > 0


def test_bad_configurations_fail_with_a_message():
    with pytest.raises(ValueError, match="loss"):
        TrainingLossConfig(loss="dice")
    with pytest.raises(ValueError, match="prompts_per_image"):
        TrainingLossConfig(prompts_per_image=0)
    vae, masks, mask_latents, image_latents = _tiny_problem(rows=3)
    with pytest.raises(ValueError, match="groups"):
        compute_training_loss(make_tiny_unet(in_channels=8, cross_attention_dim=32), _ddpm(), image_latents, mask_latents,
                              torch.randn(3, 5, 32), masks, torch.ones_like(masks), TrainingLossConfig(prompts_per_image=2), vae=vae)
    with pytest.raises(ValueError, match="needs `vae`"):
        compute_training_loss(make_tiny_unet(in_channels=8, cross_attention_dim=32), _ddpm(), image_latents, mask_latents,
                              torch.randn(3, 5, 32), masks, torch.ones_like(masks), TrainingLossConfig(loss="e2e"))


def test_multi_prompt_samples_hold_present_classes_then_absent_ones(tmp_path):
    write_dataset(tmp_path, "train", num_images=6, size=32)
    reader = build_reader("folder", str(tmp_path), "train")
    dataset = SegmentationTrainingDataset(reader, resolution=32, scale_range=(1, 1), flip_prob=0.0, prompts_per_image=4)
    samples = [dataset[i] for i in range(3)]
    for index, sample in enumerate(samples):
        _, label = reader.load_pair(index)
        present = sorted(set(np.unique(label).tolist()) & set(range(reader.num_classes)))
        classes = sample["class_index"].tolist()
        assert len(classes) == len(set(classes)) == 4
        assert classes[: len(present)] == present
        for mask, class_index, negative in zip(sample["mask"], classes, sample["is_negative"].tolist()):
            assert torch.equal(mask[0].bool(), torch.from_numpy(label == class_index))
            assert negative == (class_index not in present)
    batch = collate_segmentation_batch(samples)
    assert batch["mask"].shape == (12, 1, 32, 32) and batch["pixel_values"].shape == (12, 3, 32, 32)
    assert batch["image_row"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(batch["pixel_values"][4], samples[1]["pixel_values"])
    with pytest.raises(ValueError, match="prompts_per_image"):
        SegmentationTrainingDataset(reader, resolution=32, prompts_per_image=7)


def _run_train_adapter(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "training" / "train_adapter.py")] + args, env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_train_adapter_e2e_multi_prompt_trains_the_decoder_and_resumes_exactly(tmp_path):
    write_dataset(tmp_path / "data", "train", num_images=8, size=64)
    make_tiny_pipeline().save_pretrained(tmp_path / "base")
    common = [
        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--train_data_dir", str(tmp_path / "data"),
        "--resolution", "64", "--train_batch_size", "4", "--prompts_per_image", "2", "--loss", "latent+e2e",
        "--train_decoder", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--report_to", "none",
        "--checkpointing_steps", "3", "--max_train_steps", "6", "--save_pipeline",
    ]  # fmt: skip
    first = _run_train_adapter(common + ["--output_dir", str(tmp_path / "run")])
    assert first.returncode == 0, first.stderr[-3000:]
    replay = _run_train_adapter(common + ["--output_dir", str(tmp_path / "replay"), "--resume_from_checkpoint",
                                          str(tmp_path / "run" / "checkpoint-3")])
    assert replay.returncode == 0, replay.stderr[-3000:]
    losses = dict(map(tuple, json.loads((tmp_path / "run" / "train_summary.json").read_text())["losses"]))
    replayed = dict(map(tuple, json.loads((tmp_path / "replay" / "train_summary.json").read_text())["losses"]))
    assert sorted(replayed) == [1, 2, 3, 4, 5, 6]  # the summary covers the whole run: 1-3 from the checkpoint
    for step in (4, 5, 6):  # trained again after the resume, on the same process path: exact
        assert replayed[step] == losses[step]
    assert (tmp_path / "run" / "checkpoint-3" / "task_decoder.safetensors").is_file()
    from digseg_diffusers import DiGSegPipeline

    base = DiGSegPipeline.from_pretrained(tmp_path / "base")
    trained = DiGSegPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    again = DiGSegPipeline.from_pretrained(tmp_path / "replay" / "pipeline")
    assert not torch.equal(base.vae.decoder.conv_out.weight, trained.vae.decoder.conv_out.weight)  # co-trained
    torch.testing.assert_close(base.vae.encoder.conv_in.weight, trained.vae.encoder.conv_in.weight, rtol=0, atol=0)
    torch.testing.assert_close(trained.vae.decoder.conv_out.weight, again.vae.decoder.conv_out.weight, rtol=0, atol=0)
    torch.testing.assert_close(trained.unet.conv_in.weight, again.unet.conv_in.weight, rtol=0, atol=0)


@pytest.mark.slow
def test_mixed_precision_keeps_frozen_weights_half_and_saves_fp32(tmp_path):
    """--mixed_precision bf16: frozen weights stored in bf16 while training, trainable ones and every saved file fp32;
    validation runs under autocast; the logged loss is the mean over the accumulated micro-batches."""
    write_dataset(tmp_path / "data", "train", num_images=8, size=64)
    write_dataset(tmp_path / "data", "val", num_images=2, size=64)
    make_tiny_pipeline().save_pretrained(tmp_path / "base")
    result = _run_train_adapter([
        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--train_data_dir", str(tmp_path / "data"),
        "--validation_split", "val", "--num_validation_images", "2", "--validation_steps", "2",
        "--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--mixed_precision", "bf16", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--report_to", "none",
        "--checkpointing_steps", "2", "--max_train_steps", "2", "--save_pipeline", "--output_dir", str(tmp_path / "run"),
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [step for step, _ in summary["losses"]] == [1, 2] and all(np.isfinite(v) for _, v in summary["losses"])
    assert summary["validation"] and np.isfinite(summary["validation"][-1]["mIoU"])
    from safetensors.torch import load_file

    for weights in (tmp_path / "run").rglob("*.safetensors"):
        dtypes = {tensor.dtype for tensor in load_file(weights).values()}
        assert dtypes == {torch.float32}, (weights, dtypes)


def test_cast_frozen_parameters_leaves_trainable_ones_exact():
    sys.path.insert(0, str(REPO / "training"))
    try:
        from train_adapter import cast_frozen_parameters
    finally:
        sys.path.pop(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    module[0].requires_grad_(False)
    trained = module[1].weight.detach().clone()
    cast_frozen_parameters([module], torch.bfloat16)
    assert module[0].weight.dtype == torch.bfloat16 and module[0].bias.dtype == torch.bfloat16
    assert module[1].weight.dtype == torch.float32 and torch.equal(module[1].weight, trained)
