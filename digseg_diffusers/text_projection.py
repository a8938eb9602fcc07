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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(hidden_states))))
