"""How a `DiGSegPipeline` goes to and from disk and the Hub: `DiGSegPipelineHubMixin`.

diffusers' `DiffusionPipeline.from_pretrained` / `save_pretrained`, plus what a DiGSeg pipeline adds: the short name
"digseg-demo", the Hub custom-pipeline layout that stock diffusers loads (`hub.layout`), the class proposer saved
beside the components, one-line errors for uncached Hub ids offline and for pickled-only weights, and no PEFT keys in
a saved folder (`lora_loader.DiGSegLoraLoaderMixin.components_for_saving`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from .demo import resolve_model_name  # the short name "digseg-demo" -> the packaged demo model
from .hub.files import hub_kwargs, require_hub_source, resolve_file
from .text_projection import DiGSegTextProjection

if TYPE_CHECKING:
    from .pipeline_digseg import DiGSegPipeline

CLASS_PROPOSER_SUBFOLDER = "class_proposer"
"""Subfolder of a saved pipeline holding its class proposer (not a diffusers component, see
`DiGSegPipeline.class_proposer`: saved and loaded by this class)."""


class DiGSegPipelineHubMixin:
    """Loading and saving of `DiGSegPipeline` (placed before `DiffusionPipeline` in its bases); see the module."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiGSegPipeline":
        """`DiffusionPipeline.from_pretrained`, plus the short name "digseg-demo" and the saved class proposer.

        Weights stay memory-mapped where diffusers can: a reload reproduces the saved pipeline up to float32
        rounding (~1e-6 on CPUs); `align_cpu_weights` makes it bit-exact at the cost of a copy.
        """
        pretrained_model_name_or_path = resolve_model_name(pretrained_model_name_or_path)
        require_hub_source(pretrained_model_name_or_path, "the DiGSeg pipeline", **hub_kwargs(kwargs))
        has_proposer_argument = "class_proposer" in kwargs
        class_proposer = kwargs.pop("class_proposer", None)
        # Never unpickle weights unless asked to: a folder with only `.bin` files is refused with the file named.
        kwargs.setdefault("use_safetensors", True)
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            pickled = _pickled_only_weights(str(pretrained_model_name_or_path)) if kwargs["use_safetensors"] else []
            if not pickled:
                raise
            raise OSError(
                f"{pretrained_model_name_or_path}: {', '.join(pickled)} hold(s) only pickled `.bin` weights, which "
                "are not loaded by default (unpickling can run code). For a folder you trust, pass "
                "`use_safetensors=None` (safetensors where present, `.bin` otherwise), then `save_pretrained` it "
                "to convert it to safetensors."
            ) from error
        _check_loaded_components(pipe, str(pretrained_model_name_or_path))
        # The saved class proposer (if any) comes back too, unless `class_proposer=` (even None) was given.
        if not has_proposer_argument:
            class_proposer = _load_class_proposer(str(pretrained_model_name_or_path), kwargs)
        pipe.set_class_proposer(class_proposer)
        return pipe

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike, *args, **kwargs) -> dict[str, Any]:
        """`model_index.json` with the stock-diffusers loader entry `_class_name` mapped back to this class, so that
        diffusers' Hub download does not import the repo's ``pipeline_digseg.py`` stub (see `hub.layout`)."""
        from .hub.layout import package_model_index

        # Extra arguments (diffusers < 0.42 passes `dduf_entries`) go through unchanged.
        return package_model_index(super()._dict_from_json_file(json_file, *args, **kwargs), components=False)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """`ConfigMixin.load_config`, with the custom components' stub entries mapped to the package's classes, so
        that loading runs no code from the folder or repo (`trust_remote_code` is not needed)."""
        from .hub.layout import package_model_index

        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (package_model_index(loaded[0]),) + loaded[1:]
        return package_model_index(loaded)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """`DiffusionPipeline.save_pretrained` in the Hub custom-pipeline layout, plus the class proposer.

        The folder loads with stock diffusers (``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``;
        see `hub.layout`) and with `DiGSegPipeline.from_pretrained`. The class proposer (if set) goes to
        ``class_proposer/``. With ``push_to_hub=True`` (``repo_id``, ``token``, ``private``, ``commit_message``,
        ``create_pr`` in `kwargs`) the folder gets a DiGSeg model card and is uploaded.
        """
        from .hub.layout import write_loader_files

        push_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
        if self.class_proposer is not None:
            self.class_proposer.save_pretrained(os.path.join(save_directory, CLASS_PROPOSER_SUBFOLDER))
        with self.components_for_saving(save_directory):
            super().save_pretrained(
                save_directory, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size, **kwargs
            )
        write_loader_files(save_directory)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
            self._upload_with_card(str(save_directory), repo_id, **push_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> str:
        """Upload the pipeline (Hub custom-pipeline layout, DiGSeg model card) to the Hub repo `repo_id`."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return self._upload_with_card(
                folder, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr
            )

    def _upload_with_card(self, folder: str, repo_id: str, **push_kwargs) -> str:
        """Write the DiGSeg pipeline card (unless the folder has a README.md already) and upload the folder."""
        from .hub.cards import CARD_NAME, push_folder_to_hub, write_pipeline_card

        if not os.path.isfile(os.path.join(folder, CARD_NAME)):
            write_pipeline_card(folder, self, repo_id=repo_id)
        return push_folder_to_hub(folder, repo_id, what="DiGSeg pipeline", **push_kwargs)


def _check_loaded_components(pipe: "DiGSegPipeline", source: str) -> None:
    """Refuse a loaded pipeline that lacks a required component instead of failing later inside a call.

    diffusers leaves a component whose folder is missing as None, and transformers builds an *empty* tokenizer
    (special tokens only) from a folder without vocabulary files; both would only surface as wrong masks.
    """
    required = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_projection")
    missing = [name for name in required if getattr(pipe, name, None) is None]
    if missing:
        raise OSError(f"{source}: the DiGSeg pipeline is missing its {', '.join(missing)} component(s).")
    if isinstance(pipe.text_projection, DiGSegTextProjection):  # one of another model: refused now, not mid-call
        pipe.text_projection.check_widths(pipe.text_encoder.config.hidden_size, pipe.unet.config.cross_attention_dim, source)
    tokenizer = pipe.tokenizer
    if hasattr(tokenizer, "all_special_tokens") and len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise OSError(
            f"{source}: the tokenizer has no vocabulary (only its {len(tokenizer)} special tokens): its files are "
            "missing from the `tokenizer/` folder."
        )


def _pickled_only_weights(folder: str) -> list[str]:
    """The component subfolders of a local pipeline folder whose weights exist only as pickled `.bin` files."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        files = os.listdir(os.path.join(folder, name)) if os.path.isdir(os.path.join(folder, name)) else []
        if any(f.endswith(".bin") for f in files) and not any(f.endswith(".safetensors") for f in files):
            found.append(f"{name}/")
    return found


def _load_class_proposer(pretrained_model_name_or_path: str, kwargs: dict):
    """The proposer saved in ``class_proposer/`` of a pipeline folder or Hub repo, or None when there is none."""
    from .proposal import PROPOSER_CONFIG_NAME, DiGSegClassProposer

    lookup = hub_kwargs(kwargs)
    if resolve_file(pretrained_model_name_or_path, PROPOSER_CONFIG_NAME, CLASS_PROPOSER_SUBFOLDER, **lookup) is None:
        return None
    return DiGSegClassProposer.from_pretrained(
        pretrained_model_name_or_path, subfolder=CLASS_PROPOSER_SUBFOLDER, **lookup
    )


def align_cpu_weights(module: torch.nn.Module, alignment: int = 64) -> torch.nn.Module:
    """Copy CPU parameters and buffers that sit at unaligned addresses into freshly allocated memory (opt-in).

    Memory-mapped weights can start at any byte offset, and CPU kernels then take another (equally valid)
    summation order (~1e-6 differences). Realigned, a loaded model reproduces the saved one bit for bit, but
    the weights are copied (no more memory-mapping), so `from_pretrained` leaves it to the caller.
    """
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()
    return module
