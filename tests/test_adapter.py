import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from digseg_diffusers.adapter import (
    DIGSEG_METADATA_KEY,
    FULL_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    DiGSegAdapterConfig,
    adapter_state_dict,
    apply_adapter,
    cross_attention_levels,
    default_levels,
    fuse_adapter,
    is_adapter_fused,
    load_adapter,
    read_adapter,
    save_adapter,
    select_adapter_modules,
    unfuse_adapter,
)
from digseg_diffusers.testing_utils import make_tiny_components, make_tiny_unet, write_hub_cache
from digseg_diffusers.text_projection import DiGSegTextProjection

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _projections(attention_names):
    return {f"{name}.{projection}" for name in attention_names for projection in PROJECTIONS}


def _cross(block, attention_index=0):
    return f"{block}.attentions.{attention_index}.transformer_blocks.0.attn2"


MID_CROSS = "mid_block.attentions.0.transformer_blocks.0.attn2"
MID_SELF = "mid_block.attentions.0.transformer_blocks.0.attn1"


def _weights_file(folder):
    return next(folder / name for name in (LORA_WEIGHTS_NAME, FULL_WEIGHTS_NAME) if (folder / name).is_file())


def _rewrite_document(folder, document):
    """Hand-edit the config document stored in an adapter file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _weights_file(folder)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(path), path, metadata={**metadata, DIGSEG_METADATA_KEY: json.dumps(document)})


@pytest.fixture
def components():
    parts = make_tiny_components()
    return parts["unet"], parts["text_projection"]


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 8, 16, 16, generator=generator)  # 16x16: the mid block sees 2x2 tokens
    text_states = torch.randn(2, 5, 24, generator=generator)
    return sample, torch.tensor([999, 10]), text_states


def _forward(unet, text_projection, seed=0):
    sample, timesteps, text_states = _inputs(seed)
    return unet(sample, timesteps, encoder_hidden_states=text_projection(text_states)).sample


def _train(unet, text_projection, parameters, steps=3):
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    unet.train()
    for step in range(steps):
        loss = _forward(unet, text_projection, seed=step).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unet.eval()


def _snapshot(*modules):
    """Parameter objects with a copy of their values; PEFT wraps layers but keeps the base parameter objects."""
    return [(name, p, p.detach().clone()) for module in modules for name, p in module.named_parameters()]


# ------------------------------------------------------------------------------------------------ selection


def test_levels_of_the_sd2_layout(components):
    unet, _ = components
    assert cross_attention_levels(unet) == (0, 1, 2)
    assert default_levels(unet) == (1, 2)


def test_default_selection_is_two_middle_levels_and_mid_block(components):
    unet, _ = components
    selected = select_adapter_modules(unet)
    expected = _projections(
        [
            _cross("down_blocks.1"),
            _cross("down_blocks.2"),
            # level 1 mirrors to up_blocks.2, level 2 to up_blocks.1; up blocks have two attentions each.
            _cross("up_blocks.2", 0),
            _cross("up_blocks.2", 1),
            _cross("up_blocks.1", 0),
            _cross("up_blocks.1", 1),
            MID_CROSS,
            MID_SELF,
        ]
    )
    assert len(selected) == len(set(selected)) == 32
    assert set(selected) == expected


def test_custom_levels_and_mid_block_switches(components):
    unet, _ = components
    level_0 = DiGSegAdapterConfig(levels=(0,), include_mid_block=False)
    assert set(select_adapter_modules(unet, level_0)) == _projections(
        [_cross("down_blocks.0"), _cross("up_blocks.3", 0), _cross("up_blocks.3", 1)]
    )
    cross_only_mid = DiGSegAdapterConfig(levels=(2,), mid_block_self_attention=False)
    assert set(select_adapter_modules(unet, cross_only_mid)) == _projections(
        [_cross("down_blocks.2"), _cross("up_blocks.1", 0), _cross("up_blocks.1", 1), MID_CROSS]
    )
    only_mid = DiGSegAdapterConfig(levels=())
    assert set(select_adapter_modules(unet, only_mid)) == _projections([MID_CROSS, MID_SELF])
    every_level = DiGSegAdapterConfig(levels=(2, 0, 1), include_mid_block=False)
    assert len(select_adapter_modules(unet, every_level)) == 4 * (3 + 2 * 3)


def test_levels_without_cross_attention_are_rejected(components):
    unet, _ = components
    for level in (3, 9):
        with pytest.raises(ValueError, match=f"level {level}.*cross-attention are 0, 1, 2"):
            select_adapter_modules(unet, DiGSegAdapterConfig(levels=(level,)))


def test_selection_follows_structure_on_another_layout():
    # SDXL-like: plain top level, cross-attention below; 3 levels, so the middle is level 1.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    assert cross_attention_levels(unet) == (1, 2)
    assert default_levels(unet) == (1, 2)
    selected = set(select_adapter_modules(unet, DiGSegAdapterConfig(levels=(2,), include_mid_block=False)))
    assert selected == _projections([_cross("down_blocks.2"), _cross("up_blocks.0", 0), _cross("up_blocks.0", 1)])


def test_config_validation_and_round_trip():
    for bad in (
        {"mode": "qlora"},
        {"rank": 0},
        {"alpha": -1},
        {"dropout": 1.0},
        {"levels": "12"},
        {"levels": (1, -1)},
        {"train_conv_in": "yes"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DiGSegAdapterConfig(**bad)
    config = DiGSegAdapterConfig(mode="full", levels=[2, 1, 2], rank=4, alpha=16, base_model="some/sd2")
    assert config.levels == (1, 2)
    assert DiGSegAdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ------------------------------------------------------------------------------------------------ training


def test_lora_training_touches_only_the_selected_parts(components):
    unet, text_projection = components
    before = _snapshot(unet, text_projection)
    config = DiGSegAdapterConfig(rank=4, alpha=4)
    parameters = apply_adapter(unet, text_projection, config)
    selected = set(select_adapter_modules(unet, config))

    lora_modules = {name.rsplit(".lora_", 1)[0] for name, _ in unet.named_parameters() if ".lora_" in name}
    assert lora_modules == selected
    lora_parameters = [p for name, p in unet.named_parameters() if ".lora_" in name]
    expected = lora_parameters + list(unet.conv_in.parameters()) + list(text_projection.parameters())
    assert {id(p) for p in parameters} == {id(p) for p in expected}
    assert all(p.requires_grad for p in parameters)
    assert sum(p.requires_grad for p in unet.parameters()) == len(lora_parameters) + 2

    lora_before = [p.detach().clone() for p in lora_parameters]
    _train(unet, text_projection, parameters)

    for name, parameter, value in before:
        if name.startswith("conv_in.") or parameter in set(text_projection.parameters()):
            assert not torch.equal(parameter, value), name
        else:
            assert torch.equal(parameter, value), f"frozen weight {name} changed"
    assert all(not torch.equal(p, v) for p, v in zip(lora_parameters, lora_before))


def test_full_mode_trains_the_selected_weights_directly(components):
    unet, text_projection = components
    before = _snapshot(unet, text_projection)
    config = DiGSegAdapterConfig(mode="full", levels=(1,), include_mid_block=False)
    selected = select_adapter_modules(unet, config)
    parameters = apply_adapter(unet, text_projection, config)
    assert not any("lora" in name for name, _ in unet.named_parameters())
    assert not hasattr(unet, "peft_config") or not unet.peft_config

    trainable_prefixes = tuple(f"{name}." for name in selected) + ("conv_in.",)
    _train(unet, text_projection, parameters)
    text_parameters = set(text_projection.parameters())
    for name, parameter, value in before:
        trained = name.startswith(trainable_prefixes) or parameter in text_parameters
        assert parameter.requires_grad == trained, name
        assert torch.equal(parameter, value) != trained, name
    assert {id(p) for p in parameters} == {id(p) for _, p, _ in before if p.requires_grad}


def test_applying_twice_is_refused(components):
    unet, text_projection = components
    apply_adapter(unet, text_projection)
    with pytest.raises(ValueError, match="already carries a DiGSeg LoRA"):
        apply_adapter(unet, text_projection)


# ------------------------------------------------------------------------------------------- save and load


def _trained(config, seed=0):
    parts = make_tiny_components(seed=seed)
    unet, text_projection = parts["unet"], parts["text_projection"]
    parameters = apply_adapter(unet, text_projection, config)
    _train(unet, text_projection, parameters, steps=2)
    return unet, text_projection


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_save_and_load_give_bit_identical_outputs(tmp_path, mode):
    config = DiGSegAdapterConfig(mode=mode, rank=4, alpha=8, base_model="tiny/sd2-base")
    unet, text_projection = _trained(config)
    save_adapter(tmp_path, unet, text_projection, config)
    with torch.no_grad():
        expected = _forward(unet, text_projection)

    fresh_unet = make_tiny_unet(seed=0).eval()
    fresh_projection = DiGSegTextProjection(24, 32)  # other random init: the adapter must overwrite it
    with torch.no_grad():
        assert not torch.equal(_forward(fresh_unet, fresh_projection), expected)
    loaded = load_adapter(fresh_unet, fresh_projection, str(tmp_path))
    assert loaded == DiGSegAdapterConfig(mode=mode, levels=(1, 2), rank=4, alpha=8, base_model="tiny/sd2-base")
    with torch.no_grad():
        assert torch.equal(_forward(fresh_unet, fresh_projection), expected)
    assert not any(p.requires_grad for p in fresh_unet.parameters())

    document = read_adapter(tmp_path)[0]
    assert document["mode"] == mode and document["levels"] == [1, 2]
    assert document["rank"] == 4 and document["alpha"] == 8 and document["base_model"] == "tiny/sd2-base"
    assert document["architecture"]["cross_attention_dim"] == 32
    assert document["architecture"]["block_out_channels"] == [16, 32, 32, 32]
    assert document["architecture"]["in_channels"] == 8
    assert document["architecture"]["text_projection_in_features"] == 24
    assert document["architecture"]["text_projection_out_features"] == 32
    assert document["target_modules"] == select_adapter_modules(unet, config)
    keys = set(load_file(tmp_path / (LORA_WEIGHTS_NAME if mode == "lora" else FULL_WEIGHTS_NAME)))
    assert keys == set(adapter_state_dict(unet, text_projection, config))
    assert {"unet.conv_in.weight", "unet.conv_in.bias", "text_projection.fc1.weight"} <= keys
    assert all(key.startswith(("unet.", "text_projection.")) for key in keys)
    assert any("lora_A" in key for key in keys) == (mode == "lora")


def test_adapter_holds_only_the_adapter(components):
    unet, text_projection = components
    config = DiGSegAdapterConfig(rank=2, train_text_projection=False)
    apply_adapter(unet, text_projection, config)
    state = adapter_state_dict(unet, text_projection, config)
    lora_keys = [key for key in state if "lora" in key]
    assert len(lora_keys) == 2 * len(select_adapter_modules(unet, config))
    assert set(state) - set(lora_keys) == {"unet.conv_in.weight", "unet.conv_in.bias"}


def test_loading_replaces_a_previous_adapter_and_works_when_fused(tmp_path):
    config = DiGSegAdapterConfig(rank=4)
    first_unet, first_projection = _trained(config, seed=0)
    save_adapter(tmp_path / "first", first_unet, first_projection, config)
    with torch.no_grad():
        first_output = _forward(first_unet, first_projection)

    # A second adapter trained on the same base with other data.
    unet, text_projection = make_tiny_unet(seed=0), DiGSegTextProjection(24, 32)
    parameters = apply_adapter(unet, text_projection, config)
    torch.manual_seed(1)
    for p in parameters:
        p.data.add_(0.05 * torch.randn_like(p))
    fuse_adapter(unet)
    load_adapter(unet, text_projection, tmp_path / "first")
    assert not is_adapter_fused(unet)
    with torch.no_grad():
        assert torch.equal(_forward(unet.eval(), text_projection), first_output)


def test_loading_onto_another_architecture_is_a_clear_error(tmp_path):
    config = DiGSegAdapterConfig(rank=4)
    unet, text_projection = _trained(config)
    save_adapter(tmp_path, unet, text_projection, config)

    wider_text = make_tiny_unet(cross_attention_dim=48)
    with pytest.raises(ValueError, match=r"cross_attention_dim: 32 \(adapter\) vs 48 \(this model\)"):
        load_adapter(wider_text, DiGSegTextProjection(24, 48), tmp_path)
    assert not getattr(wider_text, "peft_config", None)

    other_widths = make_tiny_unet(block_out_channels=(16, 32, 32, 64))
    with pytest.raises(ValueError, match="block_out_channels"):
        load_adapter(other_widths, DiGSegTextProjection(24, 32), tmp_path)

    with pytest.raises(ValueError, match="text_projection_in_features: 24 \\(adapter\\) vs 16"):
        load_adapter(make_tiny_unet(), DiGSegTextProjection(16, 32), tmp_path)

    # No fingerprint (a hand-edited config): the shape check still gives a ValueError, not a torch traceback.
    document = read_adapter(tmp_path)[0]
    del document["architecture"]
    _rewrite_document(tmp_path, document)
    with pytest.raises(ValueError, match="text projection: shape mismatch fc1.weight"):
        load_adapter(make_tiny_unet(), DiGSegTextProjection(16, 32), tmp_path)

    # A config whose rank does not match the weights: refused before the model is touched, so an adapter
    # loaded earlier keeps working.
    target = make_tiny_unet().eval()
    load_adapter(target, DiGSegTextProjection(24, 32), tmp_path)
    with torch.no_grad():
        before = _forward(target, text_projection)
    document["rank"] = 8
    _rewrite_document(tmp_path, document)
    rank_mismatch = r"attention: shape mismatch .*lora_A.weight: \(4, 32\) \(adapter\) vs \(8, 32\)"
    with pytest.raises(ValueError, match=rank_mismatch):
        load_adapter(target, DiGSegTextProjection(24, 32), tmp_path)
    with torch.no_grad():
        assert torch.equal(_forward(target, text_projection), before)


def test_fuse_matches_unfused_outputs(components):
    config = DiGSegAdapterConfig(rank=4)
    unet, text_projection = _trained(config)
    with torch.no_grad():
        unfused = _forward(unet, text_projection)
        fuse_adapter(unet)
        assert is_adapter_fused(unet)
        fused = _forward(unet, text_projection)
        unfuse_adapter(unet)
        assert not is_adapter_fused(unet)
        restored = _forward(unet, text_projection)
    assert not torch.equal(fused, unfused)  # the weights really were merged
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    assert torch.equal(restored, unfused)  # unfusing restores the base weights exactly


def test_bad_sources_give_clear_errors(tmp_path, components):
    unet, text_projection = components
    with pytest.raises(ValueError, match="not a DiGSeg adapter folder.*none of"):
        load_adapter(unet, text_projection, tmp_path)
    with pytest.raises(OSError, match="not in the Hugging Face cache"):
        load_adapter(unet, text_projection, "nobody/no-such-adapter", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(OSError, match="neither a local folder nor a valid Hugging Face Hub repo id"):
        load_adapter(unet, text_projection, str(tmp_path / "absent" / "adapter"))


def test_loads_from_the_hub_cache(tmp_path):
    """A Hub id resolves through huggingface_hub (here offline, from a cache laid out as downloads leave it)."""
    config = DiGSegAdapterConfig(rank=2)
    unet, text_projection = _trained(config)
    save_adapter(tmp_path / "adapter", unet, text_projection, config)
    write_hub_cache(tmp_path / "cache", "someone/digseg-tiny", tmp_path / "adapter")

    fresh_unet, fresh_projection = make_tiny_unet(seed=0).eval(), DiGSegTextProjection(24, 32)
    load_adapter(
        fresh_unet, fresh_projection, "someone/digseg-tiny", cache_dir=tmp_path / "cache", local_files_only=True
    )
    with torch.no_grad():
        assert torch.equal(_forward(fresh_unet, fresh_projection), _forward(unet, text_projection))
