"""diffusers' pipeline conventions, checked the way diffusers' own suite checks its pipelines.

`TestDiGSegPipelineConventions` mirrors `PipelineTesterMixin` (diffusers' tests/pipelines/test_pipelines_common.py)
as its Marigold tests (tests/pipelines/marigold/test_marigold_depth.py) use it: the same dummy-component /
dummy-input pattern and, where a check applies, the same test name. Where this pipeline differs on purpose, the
class says so in a comment and docs/pipeline_conventions.md explains why. Everything runs on the CPU with the tiny
components (32 px images, 1 step unless a test needs more).
"""

import accelerate
import diffusers
import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from packaging.version import Version

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.mask_decoder import DiGSegMaskDecoder
from digseg_diffusers.testing_utils import assert_close_across_paths, make_tiny_components

PROMPTS = ["circle", "star"]


def to_np(maps) -> np.ndarray:
    """Per-image outputs (a list of ``[K, H, W]`` maps) as one ``[N, K, H, W]`` array."""
    return np.stack([m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m) for m in maps])


def module_components(pipe) -> dict:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


class TestDiGSegPipelineConventions:
    """`PipelineTesterMixin`'s checks for `DiGSegPipeline`.

    Differences from diffusers' conventions, on purpose (docs/pipeline_conventions.md):
    - outputs are per-image lists of ``[K, H, W]`` maps (K prompts per image, and images may have different
      prompt counts), not one ``[N, ...]`` batch array: the mixin's ``output[0].shape[0]`` becomes ``len(output[0])``;
    - `generator` is one generator, or one per *row* (images x prompts x ensemble_size), not one per image;
    - there is no `num_images_per_prompt` (a segmentation has one answer per image and prompt; `ensemble_size`
      averages several noise draws into that one answer), no `guidance_scale` (so no CFG callbacks) and no
      ``output_type="latent"`` (``output_latent=True`` returns the latents next to the maps);
    - `prompt` (or `vocabulary`) is required and there is no `prompt_embeds` argument, so the mixin's
      `test_encode_prompt_works_in_isolation` does not apply; the pipeline caches prompt embeddings itself;
    - saved folders are loaded from safetensors only: diffusers' tests save with ``safe_serialization=False``,
      which this pipeline's `from_pretrained` refuses unless ``use_safetensors=None`` is passed;
    - `enable_sequential_cpu_offload(device="cpu")` fails inside accelerate (its execution device becomes
      "cpu:0", which accelerate cannot offload to), and the mixin's offload tests need an accelerator: here both
      offloads are checked on the CPU with the hooks diffusers installs (model offload through diffusers with
      ``device="cpu"``, sequential offload with accelerate's `cpu_offload` on the "cpu" device).
    """

    pipeline_class = DiGSegPipeline
    params = frozenset(["image", "prompt"])
    batch_params = frozenset(["image"])
    # diffusers' canonical optional parameters, less `num_images_per_prompt` (see above).
    required_optional_params = frozenset(
        ["num_inference_steps", "generator", "latents", "output_type", "return_dict", "callback_on_step_end",
         "callback_on_step_end_tensor_inputs"]
    )  # fmt: skip

    def get_dummy_components(self, with_mask_decoder: bool = False) -> dict:
        components = {**make_tiny_components(seed=0), "mask_decoder": None}
        if with_mask_decoder:
            torch.manual_seed(0)
            components["mask_decoder"] = DiGSegMaskDecoder(latent_channels=4, block_out_channels=(8, 8, 8, 8)).eval()
        return components

    def get_dummy_inputs(self, seed: int = 0, image_seed: int = 0, **overrides) -> dict:
        image = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(image_seed))
        inputs = {
            "image": image,
            "prompt": list(PROMPTS),
            "num_inference_steps": 1,
            "processing_resolution": 0,
            "generator": torch.Generator().manual_seed(seed),
            "output_type": "np",
        }
        inputs.update(overrides)
        return inputs

    def get_pipeline(self, **component_overrides) -> DiGSegPipeline:
        pipe = self.pipeline_class(**{**self.get_dummy_components(), **component_overrides})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @pytest.fixture(scope="class")
    def reference(self):
        """Probabilities of a plain float32 pipeline on the dummy inputs: ``[1, K, 32, 32]``."""
        return to_np(self.get_pipeline()(**self.get_dummy_inputs()).probabilities)

    # --- signature and outputs ---------------------------------------------------------------------------------

    def test_pipeline_call_signature(self):
        import inspect

        parameters = inspect.signature(self.pipeline_class.__call__).parameters
        optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
        assert self.params <= set(parameters), f"missing: {self.params - set(parameters)}"
        assert self.required_optional_params <= optional, f"not optional: {self.required_optional_params - optional}"
        assert "num_images_per_prompt" not in parameters  # a difference on purpose (see the class docstring)

    def test_prompt_is_required(self):
        inputs = self.get_dummy_inputs()
        del inputs["prompt"]
        with pytest.raises(ValueError, match="`prompt`"):
            self.get_pipeline()(**inputs)

    def test_inference_batch_consistent(self):
        pipe = self.get_pipeline()
        for batch_size in (1, 2):
            inputs = self.get_dummy_inputs(image=[self.get_dummy_inputs(image_seed=i)["image"] for i in range(batch_size)])
            out = pipe(**inputs)
            assert len(out.probabilities) == len(out.masks) == len(out.label_maps) == len(out.prompts) == batch_size
            assert all(p.shape == (len(PROMPTS), 32, 32) for p in out.probabilities)
            assert all(m.shape == (32, 32) for m in out.label_maps)

    def test_inference_batch_single_identical(self):
        """Each image of a batch gets what it gets alone, given the same per-row generators (image-major rows)."""
        pipe = self.get_pipeline()
        batch_size, k = 3, len(PROMPTS)
        images = [self.get_dummy_inputs(image_seed=i)["image"] for i in range(batch_size)]
        generators = [torch.Generator().manual_seed(row) for row in range(batch_size * k)]
        batched = pipe(**self.get_dummy_inputs(image=images, generator=generators))
        assert len(batched.probabilities) == batch_size
        for index in (0, batch_size - 1):
            single_generators = [torch.Generator().manual_seed(row) for row in range(index * k, (index + 1) * k)]
            single = pipe(**self.get_dummy_inputs(image=images[index], generator=single_generators))
            assert_close_across_paths(batched.probabilities[index], single.probabilities[0], what=f"image {index}")
        assert not np.array_equal(batched.probabilities[0], batched.probabilities[1])  # the images do differ

    def test_dict_tuple_outputs_equivalent(self):
        pipe = self.get_pipeline()
        # (extra arguments, fields returned): the tuple has the fields that are not None, in field order.
        cases = [
            ({}, 4),  # probabilities, masks, label_maps, prompts
            ({"output_latent": True}, 5),  # ..., latents
            ({"output_masks": False, "ensemble_size": 2, "output_uncertainty": True}, 4),  # no masks; uncertainty
        ]
        for extra, num_fields in cases:
            output = pipe(**self.get_dummy_inputs(**extra))
            output_tuple = pipe(**self.get_dummy_inputs(**extra), return_dict=False)
            expected = output.to_tuple()
            assert isinstance(output_tuple, tuple) and len(output_tuple) == len(expected) == num_fields
            assert all(field is not None for field in output_tuple)
            for got, want in zip(output_tuple, expected):
                if isinstance(want, torch.Tensor):
                    assert torch.equal(got, want)
                elif isinstance(want, list) and want and isinstance(want[0], np.ndarray):
                    assert all(np.array_equal(g, w) for g, w in zip(got, want))
                else:
                    assert got == want
            np.testing.assert_array_equal(to_np(output_tuple[0]), to_np(output.probabilities))

    # --- components ----------------------------------------------------------------------------------------------

    def test_components_function(self, reference):
        init_components = self.get_dummy_components()
        pipe = self.pipeline_class(**init_components)
        pipe.set_progress_bar_config(disable=True)
        assert set(pipe.components) == set(init_components)
        assert all(pipe.components[name] is component for name, component in init_components.items())
        # A second pipeline on the same components shares the weights (diffusers' `Pipeline(**pipe.components)`).
        again = self.pipeline_class(**pipe.components)
        again.set_progress_bar_config(disable=True)
        assert again.unet is pipe.unet and again.text_projection is pipe.text_projection and again.mask_decoder is None
        np.testing.assert_array_equal(to_np(again(**self.get_dummy_inputs()).probabilities), reference)

    def test_to_device(self, reference):
        pipe = self.get_pipeline()
        for device in ("cpu", torch.device("cpu")):
            pipe.to(device)
            assert all(c.device.type == "cpu" for c in module_components(pipe).values())
            assert pipe.device.type == "cpu" and pipe._execution_device.type == "cpu"
            output = to_np(pipe(**self.get_dummy_inputs()).probabilities)
            assert not np.isnan(output).any()
            np.testing.assert_array_equal(output, reference)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
    def test_to_dtype(self, dtype, reference):
        """`pipe.to(dtype)` casts every model component and the pipeline still runs (CPU half kernels included)."""
        pipe = self.get_pipeline()
        assert all(c.dtype == torch.float32 for c in module_components(pipe).values())
        pipe.to(dtype=dtype)
        assert {name: c.dtype for name, c in module_components(pipe).items()} == dict.fromkeys(module_components(pipe), dtype)
        output = to_np(pipe(**self.get_dummy_inputs()).probabilities)
        assert output.dtype == np.float32 and 0.0 <= output.min() and output.max() <= 1.0
        assert np.abs(output - reference).max() < 0.1  # half precision, not another result

    # --- saving and loading ------------------------------------------------------------------------------------

    def test_save_load_local(self, tmp_path, reference):
        pipe = self.get_pipeline()
        pipe.save_pretrained(tmp_path)
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert set(loaded.components) == set(pipe.components)
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.config) == public(pipe.config)
        assert_close_across_paths(to_np(loaded(**self.get_dummy_inputs()).probabilities), reference)

    @pytest.mark.parametrize("with_mask_decoder", [False, True], ids=["without_mask_decoder", "with_mask_decoder"])
    def test_save_load_optional_components(self, tmp_path, with_mask_decoder):
        pipe = self.pipeline_class(**self.get_dummy_components(with_mask_decoder=with_mask_decoder))
        pipe.set_progress_bar_config(disable=True)
        output = to_np(pipe(**self.get_dummy_inputs()).probabilities)
        pipe.save_pretrained(tmp_path)
        assert (tmp_path / "mask_decoder").is_dir() == with_mask_decoder
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        if with_mask_decoder:
            assert isinstance(loaded.mask_decoder, DiGSegMaskDecoder)
            for name, weight in pipe.mask_decoder.state_dict().items():
                assert torch.equal(loaded.mask_decoder.state_dict()[name], weight), name
        else:
            assert loaded.mask_decoder is None, "`mask_decoder` did not stay None after loading"
        assert_close_across_paths(to_np(loaded(**self.get_dummy_inputs()).probabilities), output)

    def test_serialization_with_variants(self, tmp_path):
        pipe = self.get_pipeline()
        pipe.save_pretrained(tmp_path, variant="fp16")
        for name in module_components(pipe):
            weights = [p.name for p in (tmp_path / name).iterdir() if p.suffix == ".safetensors"]
            assert weights and all(".fp16." in w for w in weights), (name, weights)

    def test_loading_with_variants(self, tmp_path):
        pipe = self.get_pipeline()
        pipe.save_pretrained(tmp_path, variant="fp16")
        loaded = self.pipeline_class.from_pretrained(tmp_path, variant="fp16")
        for name, component in module_components(pipe).items():
            loaded_weights = getattr(loaded, name).state_dict()
            for key, weight in component.state_dict().items():
                assert torch.equal(loaded_weights[key], weight), f"{name}.{key}"

    def test_loading_with_incorrect_variants_raises_error(self, tmp_path):
        self.get_pipeline().save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="variant=fp16"):
            self.pipeline_class.from_pretrained(tmp_path, variant="fp16")

    def test_save_load_float16(self, tmp_path):
        """Half-precision components saved and loaded with `dtype` stay half and give the same maps (bfloat16: the
        half type every CPU kernel of the pipeline has)."""
        pipe = self.get_pipeline().to(dtype=torch.bfloat16)
        output = to_np(pipe(**self.get_dummy_inputs()).probabilities)
        pipe.save_pretrained(tmp_path)
        loaded = self.pipeline_class.from_pretrained(tmp_path, dtype=torch.bfloat16)
        loaded.set_progress_bar_config(disable=True)
        for name, component in module_components(loaded).items():
            assert component.dtype == torch.bfloat16, f"`{name}.dtype` switched from bfloat16 to {component.dtype}"
        assert_close_across_paths(to_np(loaded(**self.get_dummy_inputs()).probabilities), output)

    def test_dtype_dict(self, tmp_path):
        self.get_pipeline().save_pretrained(tmp_path)
        dtypes = {"unet": torch.bfloat16, "default": torch.float16}
        loaded = self.pipeline_class.from_pretrained(tmp_path, dtype=dtypes)
        for name, component in module_components(loaded).items():
            assert component.dtype == dtypes.get(name, dtypes["default"]), name

    def test_pipeline_with_accelerator_device_map(self, tmp_path, reference):
        """diffusers' `device_map` loading (here onto the CPU, the one device every machine has)."""
        self.get_pipeline().save_pretrained(tmp_path)
        loaded = self.pipeline_class.from_pretrained(tmp_path, device_map="cpu")
        loaded.set_progress_bar_config(disable=True)
        assert loaded.hf_device_map is not None
        assert_close_across_paths(to_np(loaded(**self.get_dummy_inputs()).probabilities), reference)

    # --- memory options ----------------------------------------------------------------------------------------

    def test_attention_slicing_forward_pass(self, reference):
        pipe = self.get_pipeline()
        for slice_size in (1, 2, "max", "auto"):
            pipe.enable_attention_slicing(slice_size=slice_size)
            output = to_np(pipe(**self.get_dummy_inputs()).probabilities)
            assert_close_across_paths(output, reference, what=f"attention slice {slice_size!r}")
        pipe.disable_attention_slicing()
        np.testing.assert_array_equal(to_np(pipe(**self.get_dummy_inputs()).probabilities), reference)

    def test_model_cpu_offload_forward_pass(self, reference):
        """diffusers' model offload, on the CPU: every model component gets a `CpuOffload` hook and stays on the
        CPU between calls; the maps are those of the plain pipeline, on the first call and the second."""
        pipe = self.get_pipeline(**self.get_dummy_components(with_mask_decoder=True))
        output_without_offload = to_np(pipe(**self.get_dummy_inputs()).probabilities)
        pipe.enable_model_cpu_offload(device="cpu")
        assert pipe._execution_device.type == "cpu"
        for _ in range(2):  # test_cpu_offload_forward_pass_twice: the hooks are re-armed after each call
            output_with_offload = to_np(pipe(**self.get_dummy_inputs()).probabilities)
            assert_close_across_paths(output_with_offload, output_without_offload)
            offloaded = module_components(pipe)
            assert set(offloaded) == {"unet", "vae", "text_encoder", "text_projection", "mask_decoder"}
            assert all(c.device.type == "cpu" for c in offloaded.values())
            wrong_hooks = {n: type(getattr(c, "_hf_hook", None)) for n, c in offloaded.items()
                           if not isinstance(getattr(c, "_hf_hook", None), accelerate.hooks.CpuOffload)}  # fmt: skip
            assert not wrong_hooks, f"not installed correct hook: {wrong_hooks}"

    def test_sequential_cpu_offload_forward_pass(self, reference):
        """Sequential offload as `enable_sequential_cpu_offload` installs it (accelerate's `cpu_offload` on every
        model component: weights on "meta", `AlignDevicesHook`s bring them in per submodule), executing on "cpu"
        (diffusers' own method would name "cpu:0", which accelerate cannot offload to)."""
        pipe = self.get_pipeline()
        for name, component in module_components(pipe).items():
            accelerate.cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)
        assert pipe._execution_device.type == "cpu"
        for _ in range(2):  # test_sequential_offload_forward_pass_twice
            assert_close_across_paths(to_np(pipe(**self.get_dummy_inputs()).probabilities), reference)
            offloaded = module_components(pipe)
            assert all(next(c.parameters()).device.type == "meta" for c in offloaded.values())
            for name, component in offloaded.items():
                hook = component._hf_hook
                hooks = hook.hooks if isinstance(hook, accelerate.hooks.SequentialHook) else [hook]
                assert all(isinstance(h, accelerate.hooks.AlignDevicesHook) for h in hooks), name

    @pytest.mark.skipif(
        Version(diffusers.__version__) < Version("0.41"),
        reason="diffusers 0.40's group offloading asks torch for an accelerator even with a CPU onload device",
    )
    def test_group_offloading_inference(self, reference):
        """diffusers' group offloading (leaf level, onload and offload device the CPU) leaves the maps unchanged."""
        pipe = self.get_pipeline()
        pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
        assert_close_across_paths(to_np(pipe(**self.get_dummy_inputs()).probabilities), reference)

    # --- step callbacks ----------------------------------------------------------------------------------------

    def test_callback_inputs(self):
        pipe = self.get_pipeline()
        assert pipe._callback_tensor_inputs == ["latents", "image_latents", "prompt_embeds"]

        def callback_inputs_subset(pipe, i, t, callback_kwargs):
            assert set(callback_kwargs) <= set(pipe._callback_tensor_inputs)
            return callback_kwargs

        def callback_inputs_all(pipe, i, t, callback_kwargs):
            assert set(callback_kwargs) == set(pipe._callback_tensor_inputs)
            return callback_kwargs

        inputs = self.get_dummy_inputs(num_inference_steps=2, output_latent=True)
        pipe(**inputs, callback_on_step_end=callback_inputs_subset, callback_on_step_end_tensor_inputs=["latents"])
        inputs = self.get_dummy_inputs(num_inference_steps=2, output_latent=True)
        pipe(**inputs, callback_on_step_end=callback_inputs_all, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)

        def callback_inputs_change_tensor(pipe, i, t, callback_kwargs):
            if i == pipe.num_timesteps - 1:
                callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
            return callback_kwargs

        inputs = self.get_dummy_inputs(num_inference_steps=2, output_latent=True, batch_size=1)
        output = pipe(**inputs, callback_on_step_end=callback_inputs_change_tensor,
                      callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)  # fmt: skip
        assert output.latents.abs().sum() == 0  # every chunk's last step was replaced

    @pytest.mark.parametrize("name", ["latents", "image_latents", "prompt_embeds"])
    def test_each_callback_tensor_input(self, name):
        """Each name of `_callback_tensor_inputs` reaches the callback alone, as the chunk's tensor, and the tensor
        the callback returns replaces it for the remaining steps."""
        pipe = self.get_pipeline()
        shapes = {"latents": (1, 4, 4, 4), "image_latents": (1, 4, 4, 4), "prompt_embeds": (1, pipe.text_max_length, 32)}
        seen = []

        def record(pipe, i, t, callback_kwargs):
            assert list(callback_kwargs) == [name] and tuple(callback_kwargs[name].shape) == shapes[name]
            seen.append(i)
            return callback_kwargs

        inputs = self.get_dummy_inputs(num_inference_steps=2, batch_size=1)
        plain = pipe(**inputs, callback_on_step_end=record, callback_on_step_end_tensor_inputs=[name])
        assert seen == [0, 1, 0, 1]  # two chunks of one row, two steps each

        def replace_after_first_step(pipe, i, t, callback_kwargs):
            return {name: torch.zeros_like(callback_kwargs[name])} if i == 0 else callback_kwargs

        inputs = self.get_dummy_inputs(num_inference_steps=2, batch_size=1)
        replaced = pipe(**inputs, callback_on_step_end=replace_after_first_step, callback_on_step_end_tensor_inputs=[name])
        assert np.abs(to_np(replaced.probabilities) - to_np(plain.probabilities)).max() > 1e-4

    def test_callback_tensor_inputs_are_checked(self):
        with pytest.raises(ValueError, match="`callback_on_step_end_tensor_inputs`"):
            self.get_pipeline()(**self.get_dummy_inputs(), callback_on_step_end=lambda *a: {},
                                callback_on_step_end_tensor_inputs=["noise_pred"])  # fmt: skip

    def test_pipeline_callback_reads_num_timesteps_and_interrupts(self):
        """A diffusers `PipelineCallback` (config-driven cut-off at ``cutoff_step_ratio * pipeline.num_timesteps``)
        stops denoising through ``pipeline._interrupt``; the next call runs in full again."""

        class InterruptAtCutoff(PipelineCallback):
            tensor_inputs = ["latents"]

            def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
                self.calls.append((step_index, pipeline.num_timesteps))
                if step_index == int(self.config.cutoff_step_ratio * pipeline.num_timesteps):
                    pipeline._interrupt = True
                return callback_kwargs

        class Recorder(PipelineCallback):
            tensor_inputs = ["latents"]

            def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
                self.latents[step_index] = callback_kwargs["latents"].clone()
                return callback_kwargs

        pipe = self.get_pipeline()
        noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
        recorder = Recorder(cutoff_step_ratio=1.0)
        recorder.latents = {}
        full = pipe(**self.get_dummy_inputs(generator=None, latents=noise, num_inference_steps=4, output_latent=True),
                    callback_on_step_end=recorder)  # fmt: skip
        assert pipe.num_timesteps == 4 and not pipe.interrupt

        stop = InterruptAtCutoff(cutoff_step_ratio=0.25)
        stop.calls = []
        callbacks = MultiPipelineCallbacks([stop])
        interrupted = pipe(**self.get_dummy_inputs(generator=None, latents=noise, num_inference_steps=4, output_latent=True),
                           callback_on_step_end=callbacks)  # fmt: skip
        assert stop.calls == [(0, 4), (1, 4)] and pipe.interrupt  # step 1 = int(0.25 * 4) of the first chunk
        # The first chunk (both rows, batch_size 8) stopped after its second step: its latents are those of step 1.
        torch.testing.assert_close(interrupted.latents, recorder.latents[1], rtol=0, atol=0)
        assert not torch.equal(interrupted.latents, full.latents)

        again = pipe(**self.get_dummy_inputs(generator=None, latents=noise, num_inference_steps=4, output_latent=True))
        assert not pipe.interrupt
        assert torch.equal(again.latents, full.latents)

    def test_interrupt_skips_the_remaining_rows(self):
        """Rows of chunks not started when ``_interrupt`` is set keep their initial noise (documented)."""
        pipe = self.get_pipeline()
        noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(1))
        calls = []

        def interrupt_at_once(pipe, i, t, callback_kwargs):
            calls.append(i)
            pipe._interrupt = True
            return callback_kwargs

        out = pipe(**self.get_dummy_inputs(generator=None, latents=noise, num_inference_steps=3, batch_size=1,
                                           output_latent=True), callback_on_step_end=interrupt_at_once)  # fmt: skip
        assert calls == [0]  # one step of the first chunk, none of the second
        assert not torch.equal(out.latents[0], noise[0]) and torch.equal(out.latents[1], noise[1])

    # --- progress bar ------------------------------------------------------------------------------------------

    def test_progress_bar_config(self, capsys):
        pipe = self.pipeline_class(**self.get_dummy_components())  # diffusers' default: the bar is shown
        pipe(**self.get_dummy_inputs(num_inference_steps=2, batch_size=1))
        shown = capsys.readouterr().err
        assert "4/4" in shown  # 2 chunks of one row x 2 steps

        pipe.set_progress_bar_config(desc="DiGSeg", leave=True)
        pipe(**self.get_dummy_inputs())
        assert "DiGSeg" in capsys.readouterr().err

        pipe.set_progress_bar_config(disable=True)
        pipe(**self.get_dummy_inputs())
        assert capsys.readouterr().err == ""

    # --- determinism -------------------------------------------------------------------------------------------

    def test_num_inference_steps_generator_latents_determinism(self, reference):
        pipe = self.get_pipeline()
        # The same generator seed gives the same maps, bit for bit (same code path).
        np.testing.assert_array_equal(to_np(pipe(**self.get_dummy_inputs(seed=0)).probabilities), reference)
        assert np.abs(to_np(pipe(**self.get_dummy_inputs(seed=1)).probabilities) - reference).max() > 1e-4
        # `latents` drawn from the same generator give the same maps as the generator.
        noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
        from_latents = pipe(**self.get_dummy_inputs(generator=None, latents=noise))
        np.testing.assert_array_equal(to_np(from_latents.probabilities), reference)
        # One generator per row: row r's noise comes from generator r.
        rows = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
        per_row = pipe(**self.get_dummy_inputs(generator=rows, output_latent=True))
        noise_rows = torch.cat([torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
        from_rows = pipe(**self.get_dummy_inputs(generator=None, latents=noise_rows, output_latent=True))
        assert torch.equal(per_row.latents, from_rows.latents)
        # More steps is another result.
        two_steps = to_np(pipe(**self.get_dummy_inputs(num_inference_steps=2)).probabilities)
        assert np.abs(two_steps - reference).max() > 1e-4
        with pytest.raises(ValueError, match="`latents` and `generator`"):
            pipe(**self.get_dummy_inputs(latents=noise))
        with pytest.raises(ValueError, match="one generator per row: 2"):
            pipe(**self.get_dummy_inputs(generator=[torch.Generator().manual_seed(0)]))
