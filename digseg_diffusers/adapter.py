"""The DiGSeg adapter: which parts of a Stable Diffusion U-Net are trained, and how they are saved and loaded.

DiGSeg fine-tunes little of the U-Net (``method.md`` section 3): the cross-attention of two middle resolution
levels, the mid-block attention (self- and cross-attention: the paper says "the mid-block attention"), and
``conv_in`` (8-channel ``[z_x, z_y,t]`` input), plus the text projection MLP. Everything else stays frozen, so an
adapter is small and applies to any copy of the base model.

Modules are chosen by *structure*, not by name, so every SD-family ``UNet2DConditionModel`` works. Level ``k``
is ``down_blocks[k]`` with its mirror ``up_blocks[n - 1 - k]``, both at ``1 / 2**k`` of the latent resolution.
By default (``levels=None``) the two cross-attention levels closest to the middle ``(n - 1) / 2`` are trained:
``(1, 2)`` for SD 1.x/2.x (the paper's "1/4 and 1/8 resolutions" does not say of what, so levels are
configurable). Each selected attention contributes ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``.

``"lora"`` mode injects PEFT LoRA layers on those projections, ``"full"`` trains their weights; ``conv_in`` and
the text projection are trained and saved whole in both. An adapter folder holds one safetensors file:
``pytorch_lora_weights.safetensors`` is diffusers' LoRA file (PEFT keys ``unet.<module>.lora_A.weight``, the PEFT
``LoraConfig`` in ``lora_adapter_metadata``, ``conv_in`` declared in ``modules_to_save``, so
``unet.load_lora_adapter(file, prefix="unet")`` loads the LoRA *and* conv_in); ``digseg_full_weights.safetensors``
holds the selected weights. The text projection is stored as ``text_projection.*``. Both carry the DiGSeg config
document (metadata key ``digseg_adapter``: config, module names, architecture fingerprint; a LoRA file without it
is refused), checked before anything is loaded: a wrong base model gives a clear ``ValueError``, and a load applies
all or nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .hub.files import resolve_file

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""A "lora" adapter: diffusers' LoRA file (the name diffusers' `load_lora_weights` looks for)."""
FULL_WEIGHTS_NAME = "digseg_full_weights.safetensors"
"""A "full" adapter (attention weights themselves, not a LoRA)."""
DIGSEG_METADATA_KEY = "digseg_adapter"
"""Safetensors metadata key of the adapter's config document (JSON)."""
ADAPTER_FORMAT = "digseg-adapter"
ADAPTER_FORMAT_VERSION = 2
APPLIED_CONFIG_ATTRIBUTE = "_digseg_adapter_config"
"""Attribute of a U-Net holding the config its DiGSeg adapter was applied or loaded with."""
# The PEFT adapter name used inside the U-Net.
PEFT_ADAPTER_NAME = "digseg"
ADAPTER_MODES = ("lora", "full")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_PREFIX = "unet."
TEXT_PROJECTION_PREFIX = "text_projection."


@dataclass
class DiGSegAdapterConfig:
    """What the DiGSeg adapter trains (see the module docstring for how levels are numbered).

    Args:
        mode: ``"lora"`` (PEFT LoRA on the selected attention projections) or ``"full"`` (their weights).
        levels: resolution levels whose cross-attention is trained; ``None`` picks the two middle levels that
            have cross-attention when applied to a U-Net.
        rank, alpha, dropout: LoRA rank, ``lora_alpha`` and ``lora_dropout`` (ignored in ``"full"`` mode).
        include_mid_block: train the mid block's attention.
        mid_block_self_attention: with ``include_mid_block``, also its self-attention (not only cross-attention).
        train_conv_in: train (and save) ``conv_in`` whole.
        train_text_projection: train (and save) the text projection MLP whole.
        base_model: name or path of the base model, recorded in the saved config for the user.
    """

    mode: str = "lora"
    levels: tuple[int, ...] | None = None
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    include_mid_block: bool = True
    mid_block_self_attention: bool = True
    train_conv_in: bool = True
    train_text_projection: bool = True
    base_model: str | None = None

    def __post_init__(self):
        if self.mode not in ADAPTER_MODES:
            raise ValueError(f"Unknown adapter `mode` {self.mode!r}; choose one of {', '.join(ADAPTER_MODES)}.")
        if self.levels is not None:
            if isinstance(self.levels, (int, str)) or not all(
                isinstance(level, int) and not isinstance(level, bool) and level >= 0 for level in self.levels
            ):
                raise ValueError(f"`levels` must be a sequence of non-negative ints or None, got {self.levels!r}.")
            self.levels = tuple(sorted(set(self.levels)))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"`rank` must be a positive int, got {self.rank!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"`alpha` must be a positive number, got {self.alpha!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        for name in ("include_mid_block", "mid_block_self_attention", "train_conv_in", "train_text_projection"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ValueError(f"`base_model` must be a string or None, got {self.base_model!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["levels"] = None if self.levels is None else list(self.levels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiGSegAdapterConfig:
        """Build a config from ``to_dict()`` output; keys that are not config fields are ignored with a warning."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("Ignoring unknown DiGSeg adapter config keys: %s", ", ".join(unknown))
        kwargs = {key: value for key, value in data.items() if key in names}
        if kwargs.get("levels") is not None:
            kwargs["levels"] = tuple(kwargs["levels"])
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- selection


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model behind DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _is_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in ("to_q", "to_k", "to_v", "to_out"))


def _is_cross_attention(module: nn.Module) -> bool:
    flag = getattr(module, "is_cross_attention", None)
    if flag is not None:
        return bool(flag)
    # Attention classes without the flag: keys are computed from another width than queries.
    return _in_features(module.to_k) != _in_features(module.to_q)


def _in_features(layer: nn.Module) -> int | None:
    layer = getattr(layer, "base_layer", layer)  # a PEFT-wrapped Linear
    return getattr(layer, "in_features", None)


def _attention_modules(block: nn.Module, prefix: str, cross_only: bool) -> list[str]:
    return [
        name
        for name, module in block.named_modules(prefix=prefix)
        if _is_attention(module) and (not cross_only or _is_cross_attention(module))
    ]


def _projection_names(unet: nn.Module, attention_names: list[str]) -> list[str]:
    modules = dict(unet.named_modules())
    return [
        f"{attention_name}.{projection}"
        for attention_name in attention_names
        for projection in ATTENTION_PROJECTIONS
        if f"{attention_name}.{projection}" in modules
    ]


def _level_blocks(unet: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """``[(qualified name, block), ...]`` for each level: its down block and its mirrored up block."""
    down_blocks = getattr(unet, "down_blocks", None)
    up_blocks = getattr(unet, "up_blocks", None)
    if down_blocks is None or up_blocks is None:
        raise ValueError(
            f"`unet` ({type(unet).__name__}) has no `down_blocks`/`up_blocks`; the DiGSeg adapter needs a "
            "UNet2DConditionModel-like U-Net."
        )
    if len(down_blocks) != len(up_blocks):
        raise ValueError(
            f"`unet` has {len(down_blocks)} down blocks but {len(up_blocks)} up blocks; levels cannot be "
            "paired by resolution."
        )
    count = len(down_blocks)
    return [
        [(f"down_blocks.{level}", down_blocks[level]), (f"up_blocks.{count - 1 - level}", up_blocks[count - 1 - level])]
        for level in range(count)
    ]


def cross_attention_levels(unet: nn.Module) -> tuple[int, ...]:
    """The resolution levels of ``unet`` that contain cross-attention (``(0, 1, 2)`` for SD 1.x/2.x)."""
    unet = _unwrap(unet)
    return tuple(
        level
        for level, blocks in enumerate(_level_blocks(unet))
        if any(_attention_modules(block, name, cross_only=True) for name, block in blocks)
    )


def default_levels(unet: nn.Module, count: int = 2) -> tuple[int, ...]:
    """The ``count`` cross-attention levels closest to the middle of the level range (``(1, 2)`` for SD2)."""
    unet = _unwrap(unet)
    middle = (len(_level_blocks(unet)) - 1) / 2
    candidates = sorted(cross_attention_levels(unet), key=lambda level: (abs(level - middle), level))
    return tuple(sorted(candidates[:count]))


def resolve_config(unet: nn.Module, config: DiGSegAdapterConfig) -> DiGSegAdapterConfig:
    """A copy of ``config`` with ``levels`` filled in and checked against ``unet``."""
    unet = _unwrap(unet)
    available = cross_attention_levels(unet)
    levels = default_levels(unet) if config.levels is None else config.levels
    for level in levels:
        if level not in available:
            raise ValueError(
                f"`levels` asks for level {level}, but this U-Net's levels with cross-attention are "
                f"{', '.join(map(str, available)) or 'none'} (level k = down_blocks[k] + its mirrored up block)."
            )
    return DiGSegAdapterConfig.from_dict({**config.to_dict(), "levels": list(levels)})


def select_adapter_modules(unet: nn.Module, config: DiGSegAdapterConfig | None = None) -> list[str]:
    """Qualified names of the attention projections (``...attn2.to_q`` etc.) that ``config`` trains."""
    unet = _unwrap(unet)
    config = resolve_config(unet, config or DiGSegAdapterConfig())
    attention_names: list[str] = []
    level_blocks = _level_blocks(unet)
    for level in config.levels:
        for name, block in level_blocks[level]:
            attention_names += _attention_modules(block, name, cross_only=True)
    if config.include_mid_block and getattr(unet, "mid_block", None) is not None:
        attention_names += _attention_modules(
            unet.mid_block, "mid_block", cross_only=not config.mid_block_self_attention
        )
    return _projection_names(unet, attention_names)


# ------------------------------------------------------------------------------------------------ applying


def _lora_config(config: DiGSegAdapterConfig, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(target_modules),
        init_lora_weights=True,
        bias="none",
    )


def has_digseg_lora(unet: nn.Module) -> bool:
    """Whether ``unet`` carries a LoRA under the DiGSeg adapter name (injected by `apply_adapter` or loaded)."""
    return PEFT_ADAPTER_NAME in (getattr(_unwrap(unet), "peft_config", None) or {})


def lora_layers(unet: nn.Module, merged: bool | None = None, adapter: str | None = None) -> list[nn.Module]:
    """The PEFT layers of ``unet``: with ``merged``, those with (True) or without (False) a fused adapter; with
    ``adapter``, those carrying that adapter name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        module
        for module in _unwrap(unet).modules()
        if isinstance(module, BaseTunerLayer)
        and (merged is None or bool(module.merged_adapters) == merged)
        and (adapter is None or adapter in getattr(module, "lora_A", {}))
    ]


def _remove_peft_layers(unet: nn.Module) -> None:
    """Put the plain layers back, so the U-Net is structurally what it was (as diffusers' `unload_lora` does)."""
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(unet)
    del unet.peft_config
    if hasattr(unet, "_hf_peft_config_loaded"):
        unet._hf_peft_config_loaded = None


def _inject_lora(unet: nn.Module, config: DiGSegAdapterConfig, target_modules: list[str]) -> None:
    lora_config = _lora_config(config, target_modules)
    if hasattr(unet, "add_adapter"):  # diffusers models: keeps unet.peft_config and the active adapter in sync
        unet.add_adapter(lora_config, adapter_name=PEFT_ADAPTER_NAME)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_config, unet, adapter_name=PEFT_ADAPTER_NAME)
        unet.peft_config = {**(getattr(unet, "peft_config", None) or {}), PEFT_ADAPTER_NAME: lora_config}


def _remove_lora(unet: nn.Module) -> None:
    """Drop a previously injected DiGSeg LoRA (unfusing it first), leaving the base weights as they were."""
    unfuse_adapter(unet)
    unet.peft_config.pop(PEFT_ADAPTER_NAME, None)
    if not unet.peft_config:  # no other adapter
        _remove_peft_layers(unet)
        return
    for module in lora_layers(unet, adapter=PEFT_ADAPTER_NAME):
        module.delete_adapter(PEFT_ADAPTER_NAME)


def _set_trainable(
    unet: nn.Module, text_projection: nn.Module | None, config: DiGSegAdapterConfig, target_modules: list[str]
) -> list[nn.Parameter]:
    unet.requires_grad_(False)
    if text_projection is not None:
        text_projection.requires_grad_(False)
    modules = dict(unet.named_modules())
    if config.mode == "lora":
        for name, parameter in unet.named_parameters():
            if "lora_" in name and f".{PEFT_ADAPTER_NAME}." in f"{name}.":
                parameter.requires_grad_(True)
    else:
        for name in target_modules:
            modules[name].requires_grad_(True)
    if config.train_conv_in:
        unet.conv_in.requires_grad_(True)
    if config.train_text_projection:
        text_projection.requires_grad_(True)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    if text_projection is not None:
        parameters += [p for p in text_projection.parameters() if p.requires_grad]
    return parameters


def _check_text_projection(text_projection: nn.Module | None, config: DiGSegAdapterConfig) -> None:
    if config.train_text_projection and text_projection is None:
        raise ValueError("`text_projection` is None but the adapter config has `train_text_projection=True`.")


def apply_adapter(
    unet: nn.Module, text_projection: nn.Module | None, config: DiGSegAdapterConfig | None = None
) -> list[nn.Parameter]:
    """Freeze everything, then make exactly the parts ``config`` selects trainable.

    In ``"lora"`` mode PEFT LoRA layers are injected into the selected projections (they start as a no-op);
    in ``"full"`` mode the projections' own weights are unfrozen. ``conv_in`` and ``text_projection`` are
    unfrozen whole when the config says so. Returns the trainable parameters, for the optimizer.
    """
    unet = _unwrap(unet)
    text_projection = _unwrap(text_projection)
    config = resolve_config(unet, config or DiGSegAdapterConfig())
    _check_text_projection(text_projection, config)
    target_modules = select_adapter_modules(unet, config)
    if not target_modules and config.mode == "lora":
        raise ValueError("The adapter config selects no attention module: give `levels` or `include_mid_block`.")
    if has_digseg_lora(unet):
        raise ValueError(
            "`unet` already carries a DiGSeg LoRA adapter; apply the adapter to a fresh U-Net, or use "
            "`load_adapter(..., is_trainable=True)` to continue training a saved one."
        )
    if config.mode == "lora":
        _inject_lora(unet, config, target_modules)
    _record_config(unet, config)
    return _set_trainable(unet, text_projection, config, target_modules)


def adapter_state_dict(
    unet: nn.Module, text_projection: nn.Module | None, config: DiGSegAdapterConfig | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors as its file holds them (`adapter_tensors`): LoRA or selected weights, ``conv_in``,
    text projection."""
    unet = _unwrap(unet)
    text_projection = _unwrap(text_projection)
    config = resolve_config(unet, config or _recorded_config(unet) or DiGSegAdapterConfig())
    _check_text_projection(text_projection, config)
    attention: dict[str, torch.Tensor] = {}
    if config.mode == "lora":
        if not has_digseg_lora(unet):
            raise ValueError("`unet` has no DiGSeg LoRA adapter; call `apply_adapter` first (or use mode='full').")
        from peft import get_peft_model_state_dict

        attention = get_peft_model_state_dict(unet, adapter_name=PEFT_ADAPTER_NAME)
    else:
        modules = dict(unet.named_modules())
        for name in select_adapter_modules(unet, config):
            if hasattr(modules[name], "base_layer"):
                raise ValueError(f"`{name}` is wrapped by a LoRA layer; a 'full' adapter needs a U-Net without LoRA.")
            attention.update({f"{name}.{key}": value for key, value in modules[name].state_dict().items()})
    conv_in = unet.conv_in.state_dict() if config.train_conv_in else {}
    return adapter_tensors(attention, conv_in, text_projection.state_dict() if config.train_text_projection else {})


def adapter_tensors(
    attention: Mapping[str, torch.Tensor],
    conv_in: Mapping[str, torch.Tensor],
    text_projection: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """An adapter file's tensors (CPU copies, keys ``unet.*`` / ``text_projection.*``) from its parts: the
    attention tensors (LoRA keys as PEFT writes them, without the adapter name, or full weights), the state of
    ``conv_in`` and of the text projection."""
    parts = {UNET_PREFIX: attention, f"{UNET_PREFIX}conv_in.": conv_in, TEXT_PROJECTION_PREFIX: text_projection}
    return {
        prefix + key: value.detach().to("cpu").clone().contiguous()
        for prefix, part in parts.items()
        for key, value in part.items()
    }


def _unprefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


# ------------------------------------------------------------------------------------------ fingerprinting


def _config_value(module: nn.Module, name: str) -> Any:
    config = getattr(module, "config", None)
    if config is None:
        return None
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return list(value) if isinstance(value, (tuple, list)) else value


def _text_projection_features(text_projection: nn.Module) -> tuple[int | None, int | None]:
    in_features = _config_value(text_projection, "in_features")
    out_features = _config_value(text_projection, "out_features")
    if in_features is None or out_features is None:
        linears = [m for m in text_projection.modules() if isinstance(m, nn.Linear)]
        if linears:
            in_features = in_features or linears[0].in_features
            out_features = out_features or linears[-1].out_features
    return in_features, out_features


_FINGERPRINT_CONFIG_KEYS = (
    "in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block", "transformer_layers_per_block",
    "down_block_types", "up_block_types",
)  # fmt: skip


def architecture_fingerprint(unet: nn.Module, text_projection: nn.Module | None = None) -> dict[str, Any]:
    """The shape-defining facts an adapter depends on; saved with it and compared when loading."""
    unet = _unwrap(unet)
    fingerprint = {name: _config_value(unet, name) for name in _FINGERPRINT_CONFIG_KEYS}
    fingerprint["unet_class"] = type(unet).__name__
    fingerprint["in_channels"] = fingerprint["in_channels"] or unet.conv_in.in_channels
    if text_projection is not None:
        in_features, out_features = _text_projection_features(_unwrap(text_projection))
        fingerprint["text_projection_in_features"] = in_features
        fingerprint["text_projection_out_features"] = out_features
    return fingerprint


def _check_fingerprint(saved: dict[str, Any], current: dict[str, Any], source: str, base_model: str | None) -> None:
    differences = [
        f"{key}: {saved[key]!r} (adapter) vs {current[key]!r} (this model)"
        for key in saved
        if key in current and saved[key] is not None and current[key] is not None and saved[key] != current[key]
    ]
    if differences:
        hint = f" It was made for base model {base_model!r}." if base_model else ""
        raise ValueError(
            f"The DiGSeg adapter from {source} does not fit this model's architecture: "
            + "; ".join(differences)
            + f".{hint} Load it onto the base model it was trained for."
        )


# ------------------------------------------------------------------------------------------ saving/loading


def _recorded_config(unet: nn.Module) -> DiGSegAdapterConfig | None:
    return getattr(_unwrap(unet), APPLIED_CONFIG_ATTRIBUTE, None)


def _record_config(unet: nn.Module, config: DiGSegAdapterConfig) -> None:
    setattr(_unwrap(unet), APPLIED_CONFIG_ATTRIBUTE, config)


def peft_lora_config_dict(
    config: DiGSegAdapterConfig, target_modules: list[str], conv_in: bool = True
) -> dict[str, Any]:
    """The PEFT `LoraConfig` of a LoRA adapter as a JSON-able dict (what diffusers stores in the file metadata).

    ``conv_in`` is declared in ``modules_to_save``: a loader that reads only this metadata (diffusers'
    ``unet.load_lora_adapter``, PEFT's ``inject_adapter_in_model``) then loads the trained ``conv_in`` too.
    """
    lora_config = _lora_config(config, target_modules)
    if config.train_conv_in and conv_in:
        lora_config.modules_to_save = ["conv_in"]
    data = lora_config.to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in data.items()}


def save_adapter(
    save_directory: str | os.PathLike,
    unet: nn.Module,
    text_projection: nn.Module | None,
    config: DiGSegAdapterConfig | None = None,
) -> str:
    """Write the adapter into ``save_directory``; returns the weights file's path. See the module docstring.

    ``config=None`` uses the config the adapter was applied or loaded with (`apply_adapter` / `load_adapter`
    record it on the U-Net), and only without one the defaults, which must then fit the U-Net's LoRA.
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"`save_directory` {str(save_directory)!r} is a file; give a folder.")
    unet = _unwrap(unet)
    text_projection = _unwrap(text_projection)
    config = resolve_config(unet, config or _recorded_config(unet) or DiGSegAdapterConfig())
    target_modules = select_adapter_modules(unet, config)
    if config.mode == "lora" and has_digseg_lora(unet) and not _lora_layout_matches(unet, config, target_modules):
        existing = unet.peft_config[PEFT_ADAPTER_NAME]
        raise ValueError(
            f"The U-Net's DiGSeg LoRA (rank {existing.r}, alpha {existing.lora_alpha}) was not made with this "
            f"adapter config (rank {config.rank}, alpha {config.alpha}, levels {list(config.levels)}); pass the "
            "config it was applied with as `config=`."
        )
    state = adapter_state_dict(unet, text_projection, config)
    return write_adapter_file(save_directory, state, config, target_modules, unet, text_projection)


def write_adapter_file(
    save_directory: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: DiGSegAdapterConfig,
    target_modules: list[str],
    unet: nn.Module,
    text_projection: nn.Module | None,
) -> str:
    """Write an adapter's tensors (keys ``unet.*`` / ``text_projection.*``), config document and the fingerprint of
    the models it fits; returns the file's path. The one writer of the format (`save_adapter`, loaded adapters)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    document = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        **config.to_dict(),
        "target_modules": target_modules,
        "architecture": architecture_fingerprint(unet, text_projection if config.train_text_projection else None),
        "library_versions": _library_versions(),
    }
    metadata = {"format": "pt", DIGSEG_METADATA_KEY: json.dumps(document, sort_keys=True)}
    if config.mode == "lora":
        lora_metadata = {f"unet.{key}": value for key, value in peft_lora_config_dict(config, target_modules).items()}
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(lora_metadata, indent=2, sort_keys=True)
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, LORA_WEIGHTS_NAME if config.mode == "lora" else FULL_WEIGHTS_NAME)
    save_file(state, path, metadata=metadata)
    return path


def _library_versions() -> dict[str, str]:
    import diffusers
    import peft

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__}


def _resolve_adapter_file(
    directory_or_hub_id: str | os.PathLike, subfolder: str | None, weight_name: str | None = None, **hub_kwargs
) -> str:
    """The adapter's weights file from a folder, a weights file, or a Hub repo id."""
    source = str(directory_or_hub_id)
    folder = os.path.join(source, subfolder) if subfolder else source
    candidates = [weight_name] if weight_name else [LORA_WEIGHTS_NAME, FULL_WEIGHTS_NAME]
    if os.path.isfile(folder):
        if folder.endswith(".safetensors"):
            return folder
        raise ValueError(f"{folder!r} is a file but not a .safetensors adapter; give the adapter's folder or Hub id.")
    for name in candidates:
        path = resolve_file(source, name, subfolder, what="the DiGSeg adapter", **hub_kwargs)
        if path is not None:
            return path
    if os.path.isdir(source):
        raise ValueError(f"{folder!r} is not a DiGSeg adapter folder: none of {', '.join(candidates)} is in it.")
    raise OSError(
        f"The Hub repo {source!r} has no DiGSeg adapter ({' or '.join(candidates)}"
        + (f" in subfolder {subfolder!r}" if subfolder else "")
        + ")."
    )


def _check_document(document: Any, source: str) -> dict[str, Any]:
    if not isinstance(document, dict) or document.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{source} is not a DiGSeg adapter (no DiGSeg adapter config in it).")
    if document.get("format_version", 0) > ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"The adapter {source} uses format version {document['format_version']}; this digseg-diffusers "
            f"reads version {ADAPTER_FORMAT_VERSION} and older. Upgrade digseg-diffusers."
        )
    return document


def read_adapter(
    directory_or_hub_id: str | os.PathLike,
    subfolder: str | None = None,
    weight_name: str | None = None,
    **hub_kwargs,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """``(config document, tensors, source)`` of a saved adapter.

    The config document lives in the weights file's metadata (key ``digseg_adapter``), so the file alone says
    what it needs: a loader handed only the LoRA file still finds out that a text projection comes with it.
    """
    from safetensors import SafetensorError, safe_open

    source = repr(str(directory_or_hub_id))
    weights_path = _resolve_adapter_file(directory_or_hub_id, subfolder, weight_name, **hub_kwargs)
    try:
        with safe_open(weights_path, framework="pt") as handle:  # one read for the config document and the tensors
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:  # truncated, corrupt or not a safetensors file
        raise ValueError(
            f"Cannot read the DiGSeg adapter {source}: its weights file {weights_path} is truncated or corrupt "
            f"({error}). Save or download the adapter again."
        ) from None
    if DIGSEG_METADATA_KEY not in metadata:
        raise ValueError(
            f"{source} holds a LoRA without DiGSeg metadata: DiGSeg adapters carry their config (and the conv_in "
            "and text projection weights) in the file; this one cannot be loaded as a DiGSeg adapter."
        )
    try:
        document = json.loads(metadata[DIGSEG_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"The DiGSeg adapter config in {source} is not valid JSON: {error}") from error
    return _check_document(document, source), tensors, source


def _document_of_state_dict(unet: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The config document of a LoRA state dict (the tensors of a DiGSeg LoRA file, without its metadata).

    Rank, targets, levels and the whole-weight parts follow from the keys and shapes. The LoRA alpha does not: as
    diffusers does for a state dict without alphas, it is taken to be the rank (scale 1), with a warning, since a
    file keeps its alpha and a dict does not.
    """
    stray = sorted(key for key, value in state.items() if not isinstance(key, str) or not torch.is_tensor(value))
    if stray:
        raise ValueError(f"A LoRA state dict maps names to tensors; these entries are not: {stray[:5]}.")
    suffix = ".lora_A.weight"
    lora_a = {key[len(UNET_PREFIX) : -len(suffix)]: value for key, value in state.items() if key.startswith(UNET_PREFIX) and key.endswith(suffix)}
    if not lora_a:
        raise ValueError(
            f"The state dict holds no DiGSeg LoRA tensors (keys '{UNET_PREFIX}<module>{suffix}'); load 'full' "
            "adapters and other formats from their file or folder."
        )
    ranks = sorted({int(value.shape[0]) for value in lora_a.values()})
    if len(ranks) != 1:
        raise ValueError(f"The LoRA state dict mixes ranks {ranks}; a DiGSeg adapter has one rank.")
    targets = sorted(lora_a)
    count = len(_level_blocks(unet))
    levels = sorted(
        {level for level in range(count) for name in targets
         if name.startswith((f"down_blocks.{level}.", f"up_blocks.{count - 1 - level}."))}
    )  # fmt: skip
    mid = [name for name in targets if name.startswith("mid_block.")]
    logger.warning("The LoRA state dict carries no alpha: using alpha = rank = %d (scale 1), as diffusers does.", ranks[0])
    config = DiGSegAdapterConfig(
        levels=tuple(levels),
        rank=ranks[0],
        alpha=float(ranks[0]),
        include_mid_block=bool(mid),
        mid_block_self_attention=any(".attn1." in name for name in mid),
        train_conv_in=any(key.startswith(f"{UNET_PREFIX}conv_in.") for key in state),
        train_text_projection=any(key.startswith(TEXT_PROJECTION_PREFIX) for key in state),
    )
    selected = select_adapter_modules(unet, config)
    if sorted(selected) == targets:
        targets = selected  # the selection's order, so that `prepare_adapter` compares like with like
    return {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, **config.to_dict(), "target_modules": targets}


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The config document of the adapter saved in a local ``folder``, or None when there is none."""
    try:
        document, _, _ = read_adapter(folder)
    except (ValueError, OSError):
        return None
    return document


def _shape(value: Any) -> torch.Size:
    return value.shape if isinstance(value, torch.Tensor) else torch.Size(value)


def _check_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, Any], what: str, source: str) -> None:
    """Same keys and shapes (``expected`` holds tensors or shapes), else a ValueError listing the differences."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = [
        f"{key}: {tuple(loaded[key].shape)} (adapter) vs {tuple(_shape(expected[key]))} (this model)"
        for key in sorted(set(loaded) & set(expected))
        if loaded[key].shape != _shape(expected[key])
    ]
    problems = [
        f"{label} {separator.join(items[:5])}" + (" ..." if len(items) > 5 else "")
        for label, separator, items in (
            ("missing", ", ", missing), ("unexpected", ", ", unexpected), ("shape mismatch", "; ", mismatched)
        )
        if items
    ]
    if problems:
        message = " | ".join(problems)
        raise ValueError(f"The DiGSeg adapter from {source} does not fit this {what}: {message.removesuffix(' ...')}.")


def _expected_lora_shapes(
    modules: dict[str, nn.Module], target_modules: list[str], rank: int
) -> dict[str, torch.Size]:
    """The LoRA tensors (PEFT's key format for linear layers) a rank-``rank`` adapter has on ``target_modules``."""
    shapes = {}
    for name in target_modules:
        layer = modules[name]
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"`{name}` is a {type(layer).__name__}, not a linear projection; cannot load LoRA into it."
            )
        shapes[f"{name}.lora_A.weight"] = torch.Size((rank, layer.in_features))
        shapes[f"{name}.lora_B.weight"] = torch.Size((layer.out_features, rank))
    return shapes


def _lora_layout_matches(unet: nn.Module, config: DiGSegAdapterConfig, target_modules: list[str]) -> bool:
    """Whether `unet` already carries an unfused DiGSeg LoRA on exactly these modules with this rank and alpha."""
    if not has_digseg_lora(unet) or is_adapter_fused(unet):
        return False
    # Compare the layers that really carry the LoRA: peft may store `target_modules` shortened to suffixes.
    carriers = set(lora_layers(unet, adapter=PEFT_ADAPTER_NAME))
    adapted = sorted(name for name, module in unet.named_modules() if module in carriers)
    existing = unet.peft_config[PEFT_ADAPTER_NAME]
    return (
        adapted == sorted(target_modules)
        and existing.r == config.rank
        and float(existing.lora_alpha) == float(config.alpha)
    )


def _copy_into(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    with torch.no_grad():
        for key, value in state.items():
            tensors[key].copy_(value)


@dataclass
class LoadedAdapter:
    """A checked adapter, split by where its tensors go (see `prepare_adapter`)."""

    config: DiGSegAdapterConfig
    target_modules: list[str]
    attention: dict[str, torch.Tensor]  # LoRA tensors (PEFT names, no adapter name) or full projection weights
    conv_in: dict[str, torch.Tensor]  # `conv_in.weight`, `conv_in.bias` when trained
    text_projection: dict[str, torch.Tensor]
    source: str


def prepare_adapter(
    unet: nn.Module,
    text_projection: nn.Module | None,
    directory_or_hub_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    weight_name: str | None = None,
    **hub_kwargs,
) -> LoadedAdapter:
    """Read an adapter and check that every tensor fits ``unet`` / ``text_projection``; changes nothing.

    The architecture fingerprint and the selected module set are checked before any tensor is compared; any
    mismatch raises ``ValueError``, so loading either applies the whole adapter or nothing.
    """
    unet = _unwrap(unet)
    text_projection = _unwrap(text_projection)
    if isinstance(directory_or_hub_id, Mapping):
        state, source = dict(directory_or_hub_id), "the given state dict"
        document = _document_of_state_dict(unet, state)
    else:
        document, state, source = read_adapter(directory_or_hub_id, subfolder, weight_name, **hub_kwargs)
    config = DiGSegAdapterConfig.from_dict(
        {key: value for key, value in document.items() if key in {f.name for f in fields(DiGSegAdapterConfig)}}
    )
    if config.train_text_projection and text_projection is None:
        raise ValueError(f"The adapter {source} carries text projection weights but `text_projection` is None.")
    saved_fingerprint = document.get("architecture", {})
    current_fingerprint = architecture_fingerprint(unet, text_projection if config.train_text_projection else None)
    _check_fingerprint(saved_fingerprint, current_fingerprint, source, config.base_model)
    try:
        config = resolve_config(unet, config)
    except ValueError as error:
        raise ValueError(f"The adapter {source} does not fit this U-Net: {error}") from error
    target_modules = select_adapter_modules(unet, config)
    saved_targets = document.get("target_modules")
    if saved_targets is not None and list(saved_targets) != target_modules:
        raise ValueError(
            f"The adapter {source} was trained on {len(saved_targets)} attention projections that this U-Net "
            f"does not have in the same places ({len(target_modules)} selected here); it needs the same U-Net "
            "layout as its base model."
        )

    unet_state, projection_state = _unprefixed(state, UNET_PREFIX), _unprefixed(state, TEXT_PROJECTION_PREFIX)
    stray = sorted(key for key in state if not key.startswith((UNET_PREFIX, TEXT_PROJECTION_PREFIX)))
    if stray:
        raise ValueError(f"The adapter {source} has tensors that belong to no component: {', '.join(stray[:5])}.")
    conv_in_state = {key: value for key, value in unet_state.items() if key.startswith("conv_in.")}
    attention_state = {key: value for key, value in unet_state.items() if not key.startswith("conv_in.")}

    base_conv_in = unet.conv_in.get_base_layer() if hasattr(unet.conv_in, "get_base_layer") else unet.conv_in
    base_conv_in = getattr(base_conv_in, "original_module", base_conv_in)
    expected_conv_in = (
        {f"conv_in.{key}": value for key, value in base_conv_in.state_dict().items()} if config.train_conv_in else {}
    )
    _check_tensors(conv_in_state, expected_conv_in, "U-Net's conv_in", source)
    expected_projection = text_projection.state_dict() if config.train_text_projection else {}
    _check_tensors(projection_state, expected_projection, "text projection", source)

    modules = dict(unet.named_modules())
    if config.mode == "lora":
        expected = _expected_lora_shapes(modules, target_modules, config.rank)
    else:
        expected = {
            f"{name}.{key}": value for name in target_modules for key, value in modules[name].state_dict().items()
        }
    _check_tensors(attention_state, expected, "U-Net's attention", source)
    return LoadedAdapter(config, target_modules, attention_state, conv_in_state, projection_state, source)


def load_adapter(
    unet: nn.Module,
    text_projection: nn.Module | None,
    directory_or_hub_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    is_trainable: bool = False,
    **hub_kwargs,
) -> DiGSegAdapterConfig:
    """Load a saved DiGSeg adapter (a `save_adapter` folder, its weights file, or a Hub repo id; ``hub_kwargs``
    such as ``revision``, ``token``, ``weight_name`` go to the download) into ``unet`` and ``text_projection`` in
    place, as training needs it; returns its config. Everything is checked first (`prepare_adapter`). A DiGSeg LoRA
    in ``unet`` is replaced; ``conv_in`` and the text projection are overwritten (the pipeline's
    ``load_lora_weights`` keeps the base weights to unload them again). ``is_trainable=True`` leaves the adapter's
    parameters trainable (as after `apply_adapter`), otherwise everything is frozen.
    """
    unet = _unwrap(unet)
    text_projection = _unwrap(text_projection)
    adapter = prepare_adapter(unet, text_projection, directory_or_hub_id, subfolder=subfolder, **hub_kwargs)
    config, target_modules = adapter.config, adapter.target_modules

    # Everything is checked: from here on the model is changed. A LoRA of the same layout (a training run
    # resuming from a checkpoint) is refilled in place, so that optimizers and DDP wrappers that hold its
    # parameters stay valid; any other LoRA is replaced.
    refill = config.mode == "lora" and _lora_layout_matches(unet, config, target_modules)
    if has_digseg_lora(unet) and not refill:
        _remove_lora(unet)
    if config.mode == "lora":
        from peft import set_peft_model_state_dict

        if not refill:
            _inject_lora(unet, config, target_modules)
        result = set_peft_model_state_dict(unet, adapter.attention, adapter_name=PEFT_ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(
                f"PEFT did not place these tensors of the adapter {adapter.source}: {result.unexpected_keys[:5]}"
            )
    else:
        _copy_into(unet, adapter.attention)
    _copy_into(unet, adapter.conv_in)
    if adapter.text_projection:
        _copy_into(text_projection, adapter.text_projection)
    _record_config(unet, config)

    if is_trainable:
        _set_trainable(unet, text_projection, config, target_modules)
    else:
        unet.requires_grad_(False)
        if text_projection is not None:
            text_projection.requires_grad_(False)
    return config


class WholeWeightAdapters:
    """The parts DiGSeg trains whole (``conv_in``, the text projection) for several named adapters.

    LoRA deltas are mixed by PEFT; these parts are full tensors, so they are mixed the same way as deltas from
    the base: ``base + sum_i w_i * (adapter_i - base)``. One active adapter at weight 1 gets its own tensors
    exactly; no active adapter gets the base tensors back exactly (copies of them are kept from the first load).
    """

    def __init__(self):
        self.base: dict[str, dict[str, torch.Tensor]] = {}
        self.adapters: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    @staticmethod
    def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in state.items()}

    def add(self, name: str, modules: dict[str, nn.Module], states: dict[str, dict[str, torch.Tensor]]) -> None:
        for part, state in states.items():
            if state and part not in self.base:
                self.base[part] = self._copy(modules[part].state_dict())
        self.adapters[name] = {part: self._copy(state) for part, state in states.items() if state}

    def remove(self, names: list[str]) -> None:
        for name in names:
            self.adapters.pop(name, None)

    def apply(self, modules: dict[str, nn.Module], weights: dict[str, float] | None) -> None:
        """Set every module to the mix of ``weights`` (adapter name -> weight); None: the base weights."""
        for part, base in self.base.items():
            active = [(w, self.adapters[n][part]) for n, w in (weights or {}).items() if part in self.adapters.get(n, {})]
            if not active:
                state = base
            elif len(active) == 1 and active[0][0] == 1.0:
                state = active[0][1]
            else:
                state = {key: base[key] + sum(w * (s[key] - base[key]) for w, s in active) for key in base}
            _copy_into(modules[part], {key: value.to(base[key].dtype) for key, value in state.items()})


# --------------------------------------------------------------------------------------------------- fusing


_UNFUSED_WEIGHT_BUFFER = "digseg_unfused_weight"


def stash_base_weights(layers: list[nn.Module]) -> None:
    """Keep a copy of each LoRA layer's base weight before it is merged (a non-persistent buffer: it follows
    ``.to()`` and is never saved), so that `restore_base_weights` gives it back bit for bit: PEFT's ``unmerge``
    subtracts the delta again, which leaves rounding errors. The one stash for every fuse in this package."""
    for layer in layers:
        layer.register_buffer(_UNFUSED_WEIGHT_BUFFER, layer.get_base_layer().weight.detach().clone(), persistent=False)


def restore_base_weights(layers: list[nn.Module]) -> None:
    """After ``unmerge``: put back the base weights `stash_base_weights` kept, and drop the copies."""
    with torch.no_grad():
        for layer in layers:
            original = layer._buffers.pop(_UNFUSED_WEIGHT_BUFFER, None)
            if original is not None:
                layer.get_base_layer().weight.copy_(original)


def fuse_adapter(unet: nn.Module, safe_merge: bool = False) -> None:
    """Merge the DiGSeg LoRA into the base weights for faster inference (no-op for 'full' adapters).

    The original weights of the merged layers are kept (a copy of the adapted projections only), so that
    ``unfuse_adapter`` restores them exactly. ``safe_merge=True`` checks the merged weights for NaNs first.
    """
    unet = _unwrap(unet)
    if not has_digseg_lora(unet):
        logger.info("No DiGSeg LoRA in this U-Net: nothing to fuse ('full' adapters are already in the weights).")
        return
    layers = lora_layers(unet, adapter=PEFT_ADAPTER_NAME)
    layers = [layer for layer in layers if PEFT_ADAPTER_NAME not in layer.merged_adapters]
    if any(layer.merged_adapters for layer in layers):
        raise ValueError("Another adapter is fused into this U-Net; unfuse it before fusing the DiGSeg one.")
    stash_base_weights(layers)
    for layer in layers:
        layer.merge(safe_merge=safe_merge, adapter_names=[PEFT_ADAPTER_NAME])


def unfuse_adapter(unet: nn.Module) -> None:
    """Undo ``fuse_adapter``: restore the original base weights exactly and apply the LoRA on the fly again."""
    layers = _fused_layers(unet)
    for layer in layers:
        layer.unmerge()
    restore_base_weights(layers)


def plain_copy(module: nn.Module, overrides: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A model of ``module``'s class and config without PEFT layers, sharing its tensors (no copy): each wrapped
    layer's base weights (merged where a LoRA is fused) under the plain name, no LoRA tensors; ``overrides``
    replace tensors by key. A pipeline folder saved from it loads into a stock model; the wrapped state
    (``...base_layer.weight``, ``...lora_A.<name>.weight``) would load as uninitialised layers."""
    from accelerate import init_empty_weights

    state = {
        key.replace(".base_layer.", "."): value
        for key, value in module.state_dict().items()
        if ".lora_" not in key and "lora_magnitude_vector" not in key
    }
    unknown = sorted(set(overrides or {}) - set(state))
    if unknown:
        raise KeyError(f"overrides name no tensor of the module: {unknown[:5]}")
    with init_empty_weights():
        plain = type(module).from_config(module.config)
    plain.load_state_dict({**state, **(overrides or {})}, strict=True, assign=True)
    return plain.eval()


def is_adapter_fused(unet: nn.Module) -> bool:
    """Whether the DiGSeg LoRA is currently merged into the base weights."""
    return bool(_fused_layers(unet))


def _fused_layers(unet: nn.Module) -> list[nn.Module]:
    """The layers the DiGSeg LoRA is merged into."""
    return [layer for layer in lora_layers(unet, merged=True) if PEFT_ADAPTER_NAME in layer.merged_adapters]


def merge_and_unload_adapter(unet: nn.Module) -> nn.Module:
    """Bake a DiGSeg LoRA into the U-Net weights and remove the PEFT layers, for a standalone `save_pretrained`.

    Unlike `fuse_adapter` this cannot be undone: the U-Net becomes a plain `UNet2DConditionModel` whose weights
    include the adapter. A U-Net without a LoRA ('full' mode) is returned unchanged.
    """
    unet = _unwrap(unet)
    if not has_digseg_lora(unet):
        return unet
    fuse_adapter(unet)
    for layer in lora_layers(unet):
        layer._buffers.pop(_UNFUSED_WEIGHT_BUFFER, None)
    _remove_peft_layers(unet)
    return unet
