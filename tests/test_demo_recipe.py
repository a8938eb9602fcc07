"""The demo recipe (`training/train_demo_model.py`): the `--full_resolution_attention` and
`--attention_head_channels` choices build the U-Net they name, the unaugmented recipe trains on cached latents,
bad arguments stop before any stage runs, and a failed stage says how to continue."""

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digseg_diffusers.training import demo_recipe
from digseg_diffusers.data.synthetic import generate_scene

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recipe():
    sys.path.insert(0, str(REPO_ROOT / "training"))
    try:
        import train_demo_model
    finally:
        sys.path.pop(0)
    return train_demo_model


def _top_level_attention(unet):
    """The transformer blocks of the full-resolution down level (empty when it has no attention)."""
    attentions = getattr(unet.down_blocks[0], "attentions", [])
    return [block for transformer in attentions for block in transformer.transformer_blocks]


@pytest.mark.parametrize("choice", ["none", "cross", "full"])
def test_full_resolution_attention_choices_build_the_named_unet(recipe, choice, tmp_path):
    from digseg_diffusers import DiGSegPipeline
    from digseg_diffusers.demo import default_model_path

    demo_recipe.build_untrained_pipeline(
        os.path.join(default_model_path(), "vae"), tmp_path, unet_channels=(16, 16, 16, 16), text_width=16,
        cross_attention_dim=16, text_layers=1, full_resolution_attention=choice, seed=0,
    )
    pipe = DiGSegPipeline.from_pretrained(tmp_path)
    blocks = _top_level_attention(pipe.unet)
    if choice == "none":
        assert blocks == []
        assert not hasattr(pipe.unet.up_blocks[-1], "attentions")
    else:
        assert blocks and all(block.attn2 is not None for block in blocks)
        # "cross": the first attention reads the text too (diffusers' only_cross_attention), no self-attention
        assert all(block.only_cross_attention == (choice == "cross") for block in blocks)
        assert hasattr(pipe.unet.up_blocks[-1], "attentions")
    # the two middle levels keep their self- and cross-attention whatever the top level gets
    for level in (1, 2):
        assert all(not block.only_cross_attention for t in pipe.unet.down_blocks[level].attentions for block in t.transformer_blocks)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generate_scene(0, size=64).image, ["circle"], generator=torch.Generator().manual_seed(0))
    assert np.asarray(out.masks[0]).shape[-2:] == (64, 64)


@pytest.mark.parametrize("head_channels, heads", [(None, 16), (32, (1, 2, 3, 3)), (16, (2, 4, 6, 6))])
def test_attention_head_channels_set_each_levels_heads(recipe, head_channels, heads, tmp_path):
    from diffusers import UNet2DConditionModel

    from digseg_diffusers.demo import default_model_path

    demo_recipe.build_untrained_pipeline(
        os.path.join(default_model_path(), "vae"), tmp_path, text_width=16, cross_attention_dim=16, text_layers=1,
        attention_head_channels=head_channels, seed=0,
    )
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert unet.config.attention_head_dim == (list(heads) if isinstance(heads, tuple) else heads)
    # the middle levels' self-attention: heads of `head_channels` channels each (diffusers counts heads)
    attention = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attention.heads == (16 if head_channels is None else 64 // head_channels)


def test_unet_channels_set_each_levels_width(recipe, tmp_path):
    from diffusers import UNet2DConditionModel

    from digseg_diffusers.demo import default_model_path

    args = recipe.parse_args(["--unet_channels", "16", "32", "48", "48"])
    demo_recipe.build_untrained_pipeline(
        os.path.join(default_model_path(), "vae"), tmp_path, text_width=16, cross_attention_dim=16, text_layers=1,
        attention_head_channels=args.attention_head_channels, unet_channels=tuple(args.unet_channels), seed=0,
    )
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert list(unet.config.block_out_channels) == [16, 32, 48, 48]
    assert unet.config.attention_head_dim == [1, 2, 3, 3]  # 16-channel heads on every level


def test_unknown_full_resolution_attention_is_rejected(recipe):
    with pytest.raises(ValueError, match="full_resolution_attention"):
        demo_recipe.demo_block_types("self")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resolution", "48"], "--resolution must be a positive multiple of 32"),
        (["--unet_steps", "0"], "--unet_steps must be at least 1"),
        (["--batch_size", "-2"], "--batch_size must be at least 1"),
        (["--learning_rate", "0"], "--learning_rate must be positive"),
        (["--negative_prob", "1"], r"--negative_prob must be in \[0, 1\)"),
        (["--timestep_bias_portion", "0"], r"--timestep_bias_\*: `bias_portion` must be in \(0, 1\]"),
        (["--timestep_bias_multiplier", "-1"], r"--timestep_bias_\*: `bias_multiplier` must be positive"),
        (["--noise_variant", "pink"], "invalid choice: 'pink'"),
        (["--attention_head_channels", "24"], r"--attention_head_channels: .* must divide every level's width"),
        (["--attention_head_channels", "-4"], r"--attention_head_channels: .* must divide every level's width"),
        (["--unet_channels", "32", "64", "96", "100"], r"--unet_channels must be positive multiples of 16"),
        (["--unet_channels", "32", "64", "96"], "expected 4 arguments"),
        (["--unet_channels", "32", "64", "96", "112", "--attention_head_channels", "32"], "must divide every level's width"),
        (["--loss", "dice"], "invalid choice: 'dice'"),
        (["--prompts_per_image", "5"], r"--batch_size \(32\) must be a multiple of --prompts_per_image \(5\)"),
        (["--train_style", "shifted"], "held-out evaluation style"),
    ],
)
def test_bad_recipe_arguments_stop_before_any_stage_runs(recipe, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(argv)
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback from a stage minutes later
    assert re.search(message, capsys.readouterr().err)


def test_default_recipe_arguments_are_accepted(recipe):
    args = recipe.parse_args([])
    assert (args.resolution, args.full_resolution_attention, args.negative_prob) == (64, "full", 0.1)
    assert (args.attention_head_channels, args.augmentation) == (16, "none")


@pytest.mark.parametrize("augmentation, cached", [("none", True), ("scale_flip", False)])
def test_unaugmented_recipe_trains_on_cached_latents(recipe, augmentation, cached, monkeypatch, tmp_path):
    commands = []
    monkeypatch.setattr(recipe, "run_stage", lambda name, command, env=None: commands.append(command))
    args = recipe.parse_args(["--augmentation", augmentation])
    recipe.run_training(args, pipeline_dir=tmp_path, data_dir=tmp_path, output_dir=tmp_path / "unet", learning_rate=1e-3, seed=0)
    (command,) = commands
    assert ("--cache_latents" in command) is cached
    if cached:  # caching needs crops that never change: no scale jitter, no flips
        assert command[command.index("--scale_range") + 1 : command.index("--scale_range") + 3] == ["1", "1"]
        assert command[command.index("--flip_prob") + 1] == "0"
    else:
        assert "--scale_range" not in command and "--flip_prob" not in command  # train_adapter.py's defaults


def test_a_failed_stage_names_itself_and_says_how_to_continue(recipe):
    with pytest.raises(recipe.StageFailed, match=r"the VAE training stage failed \(exit code 3.*run the same command again"):
        recipe.run_stage("VAE training", [sys.executable, "-c", "import sys; sys.exit(3)"])
    recipe.run_stage("VAE training", [sys.executable, "-c", "pass"])  # success returns quietly


def test_objective_and_fine_tuning_options_reach_train_adapter(recipe, monkeypatch, tmp_path):
    commands = []
    monkeypatch.setattr(recipe, "run_stage", lambda name, command, env=None: commands.append(command))
    args = recipe.parse_args(["--loss", "latent+e2e", "--prompts_per_image", "4", "--train_decoder", "--lr_warmup_steps", "20",
                              "--checkpointing_steps", "50"])
    recipe.run_training(args, pipeline_dir=tmp_path, data_dir=tmp_path, output_dir=tmp_path / "unet", learning_rate=1e-3, seed=0)
    (command,) = commands
    for flag, value in (("--loss", "latent+e2e"), ("--prompts_per_image", "4"), ("--lr_warmup_steps", "20"), ("--checkpointing_steps", "50")):
        assert command[command.index(flag) + 1] == value
    assert "--train_decoder" in command


def test_a_shared_data_dir_written_with_other_settings_is_refused(recipe, tmp_path):
    from digseg_diffusers.data.synthetic import write_dataset

    split = write_dataset(tmp_path, "train", num_images=2, size=32)
    recipe.check_dataset(split, 2, 32, "plain")
    with pytest.raises(recipe.StageFailed, match="another --data_dir"):
        recipe.check_dataset(split, 2, 32, "varied")
