"""`DiGSegLoraLoaderMixin`: diffusers' LoRA loader methods for DiGSeg adapters, factored out of the pipeline as
diffusers does (``loaders/lora_base.py``). Built on diffusers' `LoraBaseMixin` for the U-Net's LoRA; the two parts
a DiGSeg adapter trains whole (``conv_in``, the text projection: `adapter.WholeWeightAdapters`) follow every call,
mixed with the same adapter weights. Saving keeps PEFT's wrapper keys out of a pipeline folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch
from diffusers.loaders.lora_base import LoraBaseMixin
from diffusers.utils import logging

from .adapter import (
    PEFT_ADAPTER_NAME,
    DiGSegAdapterConfig,
    WholeWeightAdapters,
    adapter_tensors,
    fuse_adapter,
    has_digseg_lora,
    load_adapter,
    lora_layers,
    peft_lora_config_dict,
    plain_copy,
    prepare_adapter,
    restore_base_weights,
    save_adapter,
    stash_base_weights,
    unfuse_adapter,
    write_adapter_file,
)

logger = logging.get_logger(__name__)

SAVED_ADAPTERS_FOLDER = "adapters"
"""Subfolder of a saved pipeline that holds its unfused adapters, one DiGSeg LoRA folder per adapter name."""


class DiGSegLoraLoaderMixin(LoraBaseMixin):
    """LoRA methods of `DiGSegPipeline` (its ``unet`` and ``text_projection``); see the module docstring."""

    _lora_loadable_modules = ["unet"]
    adapter_config: DiGSegAdapterConfig | None = None
    """The config of the adapter loaded last with `load_digseg_adapter`."""

    # -------------------------------------------------------------------------------------------- loading / saving

    def save_digseg_adapter(self, save_directory: str | os.PathLike, config: DiGSegAdapterConfig | None = None) -> str:
        """Save the adapter (LoRA or full attention weights, `conv_in`, `text_projection`) into one safetensors
        file: a diffusers LoRA file for "lora" adapters (see `digseg_diffusers.adapter`). Returns its path.

        ``config=None`` uses the config the adapter was applied or loaded with.
        """
        return save_adapter(save_directory, self.unet, self.text_projection, config or self.adapter_config)

    def load_digseg_adapter(self, directory_or_hub_id: str | os.PathLike, **kwargs) -> DiGSegAdapterConfig:
        """Load an adapter from a folder, file or Hub id as the adapter "digseg" (replacing one loaded before);
        returns its config. A "lora" adapter goes through `load_lora_weights` (so it can be unloaded again); a
        "full" adapter overwrites the attention weights in place."""
        if PEFT_ADAPTER_NAME in self.get_list_adapters().get("unet", []):
            self.delete_adapters(PEFT_ADAPTER_NAME)
        adapter = prepare_adapter(self.unet, self.text_projection, directory_or_hub_id, **kwargs)
        if adapter.config.mode == "lora":
            self._add_lora(adapter, PEFT_ADAPTER_NAME)
        else:
            load_adapter(self.unet, self.text_projection, directory_or_hub_id, **kwargs)
        self.clear_prompt_cache()  # the text projection may have changed
        self.adapter_config = adapter.config
        return self.adapter_config

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        **kwargs,
    ) -> None:
        """Load a DiGSeg LoRA adapter (folder, ``.safetensors`` file, Hub id, or the file's tensors as a state dict)
        under ``adapter_name``, and make it the active adapter. ``kwargs``: ``weight_name``, ``subfolder``,
        ``cache_dir``, ``revision``, ``token``, ``local_files_only``. Everything is checked before the model
        changes: it loads whole or not at all. A state dict has no metadata, so its LoRA alpha is taken to be its
        rank (as diffusers does); load the file to keep the saved alpha.
        """
        names = self.get_list_adapters().get("unet", [])
        if adapter_name is None:
            adapter_name = next(n for n in (f"digseg_{i}" if i else "digseg" for i in range(len(names) + 1)) if n not in names)
        if adapter_name in names:
            raise ValueError(f"An adapter named {adapter_name!r} is already loaded; choose another `adapter_name`.")
        adapter = prepare_adapter(self.unet, self.text_projection, pretrained_model_name_or_path_or_dict, **kwargs)
        if adapter.config.mode != "lora":
            raise ValueError(
                f"The adapter {adapter.source} is a 'full' adapter (attention weights, not a LoRA); load it with "
                "`load_digseg_adapter`."
            )
        self._add_lora(adapter, adapter_name)

    def _add_lora(self, adapter, adapter_name: str) -> None:
        if self._has_trainable_lora():
            raise ValueError("The U-Net carries a trainable DiGSeg LoRA (`apply_adapter`); save it, then load it here.")
        if lora_layers(self.unet, merged=True):
            raise ValueError("A LoRA is fused into the U-Net; call `unfuse_lora()` before loading another adapter.")
        metadata = peft_lora_config_dict(adapter.config, adapter.target_modules, conv_in=False)
        # `prepare_adapter` has matched every tensor to the model: diffusers' warning about the *other* adapters'
        # keys (which it lists as "missing" when a second adapter is loaded) would only mislead.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            self.unet.load_lora_adapter(dict(adapter.attention), prefix=None, adapter_name=adapter_name, metadata=metadata)
        finally:
            logging.set_verbosity(verbosity)
        conv_in = {key.removeprefix("conv_in."): value for key, value in adapter.conv_in.items()}
        state = self._lora_state()
        state["bank"].add(adapter_name, self._whole_weight_modules(), {"conv_in": conv_in, "text_projection": adapter.text_projection})
        state["layouts"][adapter_name] = (adapter.config, adapter.target_modules)
        self.set_adapters([adapter_name])

    @contextlib.contextmanager
    def components_for_saving(self, save_directory: str | os.PathLike):
        """While saving, the U-Net (and text projection) as plain models: a saved pipeline never holds PEFT keys.

        - LoRA fused (`fuse_lora`), or a trainable LoRA (`apply_adapter`): the merged weights, i.e. the model
          as it computes now;
        - adapters loaded with `load_lora_weights` and not fused: the base weights, and each adapter as a DiGSeg
          LoRA file in ``adapters/<name>/`` of the folder (``pipe.load_lora_weights(folder + "/adapters/<name>")``
          puts it back).
        """
        if not getattr(self.unet, "peft_config", None):
            yield
            return
        bank = self._lora_state()["bank"]
        trainable = self._has_trainable_lora()
        fused = bool(lora_layers(self.unet, merged=True))
        unet_overrides, text_projection = {}, self.text_projection
        if trainable and not fused:
            fuse_adapter(self.unet)  # exact to undo (the base weights are kept), see `unfuse_adapter`
        elif not trainable and not fused:
            unet_overrides = {f"conv_in.{key}": value for key, value in bank.base.get("conv_in", {}).items()}
            if "text_projection" in bank.base:
                text_projection = copy.deepcopy(self.text_projection)
                text_projection.load_state_dict(bank.base["text_projection"])
            self._save_loaded_adapters(os.path.join(save_directory, SAVED_ADAPTERS_FOLDER))
        originals = {"unet": self.unet, "text_projection": self.text_projection}
        try:
            self.__dict__.update(unet=plain_copy(self.unet, unet_overrides), text_projection=text_projection)
            yield
        finally:
            self.__dict__.update(originals)
            if trainable and not fused:
                unfuse_adapter(self.unet)

    def _save_loaded_adapters(self, folder: str) -> None:
        """Each adapter loaded with `load_lora_weights` as a DiGSeg LoRA file in ``folder/<name>/``."""
        from peft import get_peft_model_state_dict

        state = self._lora_state()
        for name, (config, target_modules) in state["layouts"].items():
            whole = state["bank"].adapters.get(name, {})
            tensors = adapter_tensors(
                get_peft_model_state_dict(self.unet, adapter_name=name),
                whole.get("conv_in", {}),
                whole.get("text_projection", {}),
            )
            path = os.path.join(folder, name)
            write_adapter_file(path, tensors, config, target_modules, self.unet, self.text_projection)
        logger.warning(
            f"The pipeline is saved with its base weights; its unfused LoRA adapter(s) {list(state['layouts'])} are "
            f"in {folder}/<name> (load them with `pipe.load_lora_weights`). Call `fuse_lora()` first to save the "
            "merged weights instead."
        )

    # -------------------------------------------------------------------------------------- diffusers' LoRA methods

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights: float | list[float] | None = None) -> None:
        """Activate ``adapter_names`` with ``adapter_weights`` (default 1 each): LoRA deltas and conv_in / text
        projection deltas are scaled by the weights and summed."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [1.0] * len(names) if adapter_weights is None else adapter_weights
        weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"`adapter_weights` has {len(weights)} entries for {len(names)} adapters.")
        super().set_adapters(names, weights)
        state = self._lora_state()
        state["weights"] = {n: float(w) for n, w in zip(names, weights)}
        state["enabled"] = True
        self._apply_whole_weights()

    def get_active_adapters(self) -> list[str]:
        """The names of the active adapters (empty while disabled)."""
        state = self._lora_state()
        return list(state["weights"]) if state["enabled"] else []

    def disable_lora(self) -> None:
        """Run the base model (LoRA off, base conv_in and text projection) until `enable_lora`."""
        super().disable_lora()
        self._lora_state()["enabled"] = False
        self._apply_whole_weights()

    def enable_lora(self) -> None:
        super().enable_lora()
        self._lora_state()["enabled"] = True
        self._apply_whole_weights()

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        """Remove adapters; the others stay active with their weights."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().delete_adapters(names)
        state = self._lora_state()
        state["bank"].remove(names)
        for name in names:
            state["weights"].pop(name, None)
            state["layouts"].pop(name, None)
        self._apply_whole_weights()

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the U-Net loses its LoRA layers; conv_in and the text projection get their base
        weights back exactly. After `fuse_lora` the fused weights stay, as in diffusers: fuse, unload, then
        `save_pretrained` saves the merged model."""
        fused = bool(lora_layers(self.unet, merged=True))
        if getattr(self.unet, "peft_config", None):
            super().unload_lora_weights()
        bank = self._lora_state()["bank"]
        if not fused:
            bank.apply(self._whole_weight_modules(), None)
        self.__dict__.pop("_digseg_lora_state")  # the weights now in the modules are the base of the next adapter
        self._merged_adapters = set()
        self.clear_prompt_cache()
        self.adapter_config = None

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None, **kwargs: Any) -> None:
        """Merge the active LoRA (scaled by ``lora_scale``) into the U-Net weights for faster inference; conv_in
        and the text projection already hold the active adapters' weights. Undo with `unfuse_lora`, exactly."""
        if self._has_trainable_lora():  # the LoRA `apply_adapter` injected (training, benchmarks)
            if lora_scale != 1.0 or adapter_names:
                raise ValueError("The trainable DiGSeg LoRA fuses at scale 1 only; save and load it to use a scale.")
            fuse_adapter(self.unet, safe_merge=safe_fusing)
            return
        stash_base_weights(lora_layers(self.unet, merged=False))
        super().fuse_lora(components=["unet"], lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    def unfuse_lora(self, **kwargs: Any) -> None:
        """Undo `fuse_lora`: the LoRA is applied on the fly again and the base weights are restored exactly."""
        if self._has_trainable_lora():
            unfuse_adapter(self.unet)
            return
        merged = lora_layers(self.unet, merged=True)
        super().unfuse_lora(components=["unet"])
        restore_base_weights(merged)

    # ------------------------------------------------------------------------------- the whole-weight parts' state

    def _lora_state(self) -> dict[str, Any]:
        """The adapters' whole weights (`WholeWeightAdapters`), the active mix, whether it is enabled, and each
        loaded adapter's (config, target modules) for saving it again."""
        return self.__dict__.setdefault(
            "_digseg_lora_state", {"bank": WholeWeightAdapters(), "weights": {}, "enabled": True, "layouts": {}}
        )

    def _has_trainable_lora(self) -> bool:
        """Whether the U-Net carries the LoRA `apply_adapter` injects for training (not one loaded here)."""
        return has_digseg_lora(self.unet) and PEFT_ADAPTER_NAME not in self._lora_state()["bank"].adapters

    def _whole_weight_modules(self) -> dict[str, torch.nn.Module]:
        return {"conv_in": self.unet.conv_in, "text_projection": self.text_projection}

    def _apply_whole_weights(self) -> None:
        state = self._lora_state()
        state["bank"].apply(self._whole_weight_modules(), state["weights"] if state["enabled"] else None)
        self.clear_prompt_cache()  # the text projection holds another adapter mix now
