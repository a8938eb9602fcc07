"""The small trainable MLP between the text encoder and the U-Net's cross-attention."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DiGSegTextProjection(ModelMixin, ConfigMixin):
    """Projects text-encoder token states ``[B, L, in_features]`` to ``[B, L, out_features]``.

    DiGSeg keeps the text encoder frozen (a CLIP ViT-L/14 has width 768) while an SD2 U-Net expects 1024-wide
    cross-attention states; this two-layer MLP bridges the widths and is the text pathway's only trainable part.
    It is a diffusers model so it saves and loads beside the other pipeline components.
    """

    @register_to_config
    def __init__(self, in_features: int = 768, out_features: int = 1024, hidden_features: int | None = None):
        super().__init__()
        hidden_features = hidden_features or max(in_features, out_features)
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def check_widths(self, text_width: int, cross_attention_dim: int, source: str | None = None) -> None:
        """Refuse a projection that does not bridge this text encoder and U-Net (one saved with another model),
        naming both pairs of widths, when it is loaded rather than inside LayerNorm or cross-attention at the
        first call. ``source`` (the pipeline's folder or Hub id) prefixes the message."""
        widths = (self.config.in_features, self.config.out_features)
        if widths != (text_width, cross_attention_dim):
            raise ValueError(
                f"{source + ': ' if source else ''}the text_projection maps {widths[0]} -> {widths[1]} features, but "
                f"this pipeline needs {text_width} (text_encoder hidden_size) -> {cross_attention_dim} (unet "
                "cross_attention_dim): it belongs to another model. Use the text_projection saved with this text "
                "encoder and U-Net, or build a fresh one with `DiGSegPipeline.from_base_model`."
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.config.in_features:
            raise ValueError(
                f"the text_projection takes {self.config.in_features}-wide text states; got {hidden_states.shape[-1]} "
                "(text states of another text encoder? see `DiGSegTextProjection.check_widths`)."
            )
        return self.fc2(self.act(self.fc1(self.norm(hidden_states))))
