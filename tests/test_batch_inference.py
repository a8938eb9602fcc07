"""Dataset inference: COCO RLE, `DiGSegOutput.to_segments`, and `digseg segment --input_dir` in one and two
processes (outputs, failures, resuming after a kill, the merged COCO file)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import mask as coco_mask

from digseg_diffusers.inference import cli
from digseg_diffusers.inference.batch import (
    COCO_NAME,
    SUMMARY_NAME,
    BatchInferenceError,
    BatchOptions,
    BatchSegmenter,
    DatasetRun,
    FolderSource,
    HFDatasetSource,
    ListSource,
    check_output_format,
    coco_rle,
    mask_bbox,
    output_names,
    row_generators,
)
from digseg_diffusers.data.synthetic import generate_scene
from digseg_diffusers.testing_utils import assert_close_across_paths

REPO = Path(__file__).resolve().parent.parent
real_find_spec = importlib.util.find_spec
PROMPTS = ["circle", "square", "star"]


def _masks_to_check():
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.zeros((1, 1), bool), np.ones((1, 1), bool)]
    corner = np.zeros((6, 4), bool)
    corner[-1, -1] = True
    masks.append(corner)
    masks += [rng.random(tuple(rng.integers(1, 50, 2))) < p for p in (0.05, 0.5, 0.95)]
    blob = np.zeros((120, 90), bool)
    blob[10:100, 20:80] = True  # long runs: multi-character counts
    masks.append(blob)
    return masks


# ---------------------------------------------------------------------------------------------------------- COCO


def _decode(rle: dict) -> np.ndarray:
    return coco_mask.decode(rle).astype(bool)


def test_coco_rle_is_what_pycocotools_reads_back():
    for mask in _masks_to_check():
        rle = coco_rle(mask)
        assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)  # JSON-ready
        np.testing.assert_array_equal(_decode(rle), mask)
        assert coco_mask.area(rle) == mask.sum()
    mask = np.zeros((7, 9), bool)
    mask[1:5, 2:6] = True
    mask[6, 8] = mask[0, 0] = True
    assert coco_rle(mask)["counts"] == "01>3E00000c0M"  # column-major, compressed counts
    assert mask_bbox(mask) == [0, 0, 9, 7] and mask_bbox(np.zeros((3, 3), bool)) == [0, 0, 0, 0]


def test_coco_format_without_pycocotools_is_one_line_before_any_work(monkeypatch):
    # As if pycocotools were not installed.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else real_find_spec(name, *a))
    with pytest.raises(BatchInferenceError, match=r"pip install pycocotools \(or pip install -e \"\.\[coco\]\"\)"):
        check_output_format("coco")
    check_output_format("png")  # needs nothing more


def test_to_segments_scores_are_mean_probability_inside_the_mask(tiny_pipe):
    image = generate_scene(3, size=32).image
    kwargs = {"processing_resolution": 32, "mask_threshold": 0.5}
    out = tiny_pipe(image, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    segments = out.to_segments(0)
    kept = [k for k in range(len(PROMPTS)) if out.masks[0][k].any()]
    assert [s["label"] for s in segments] == [PROMPTS[k] for k in kept]
    for segment, k in zip(segments, kept):
        mask = np.asarray(segment["mask"]) > 0
        np.testing.assert_array_equal(mask, out.masks[0][k])
        assert segment["score"] == pytest.approx(float(out.probabilities[0][k][out.masks[0][k]].mean()), rel=1e-6)
        assert 0.5 < segment["score"] <= 1.0
    # The same call in other output forms gives the same list (uint8 maps: within rounding of 1/255).
    for extra, tolerance in (({"output_type": "pt"}, 1e-6), ({"probability_dtype": "uint8"}, 1 / 255)):
        again = tiny_pipe(image, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs, **extra).to_segments(0, mask_format="np")
        assert [s["label"] for s in again] == [s["label"] for s in segments]
        assert_close_across_paths([s["score"] for s in again], [s["score"] for s in segments], atol=tolerance, what="scores")
    # An empty mask is left out.
    out.masks[0][kept[0]][:] = False
    assert PROMPTS[kept[0]] not in [s["label"] for s in out.to_segments(0)]
    with pytest.raises(ValueError, match="output_probabilities"):
        tiny_pipe(image, PROMPTS, output_probabilities=False, **kwargs).to_segments(0)


# -------------------------------------------------------------------------------------------------------- inputs


def test_output_names_mirror_inputs_and_keep_extensions_only_on_clashes():
    keys = ["a.png", "A.jpg", "sub/b.png", "sub/c.tif", "digseg_summary.png", "x/digseg_summary.png", "rows/0001"]
    assert output_names(keys) == ["a.png", "A.jpg", "sub/b", "sub/c", "digseg_summary.png", "x/digseg_summary", "rows/0001"]


def test_list_source_resolves_relative_entries_and_drops_repeats(tmp_path):
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    listing.write_text("# a comment\n\nphotos/a.png\n photos/a.png \n../up.png\n/abs/b.jpg\n", encoding="utf-8")
    items = ListSource(listing).items()
    assert [i.key for i in items] == ["photos/a.png", "__/up.png", "abs/b.jpg"]
    assert items[0].source == str(listing.parent / "photos" / "a.png") and items[2].source == "/abs/b.jpg"
    with pytest.raises(BatchInferenceError, match="not a file"):
        ListSource(tmp_path / "missing.txt")


def test_dataset_source_needs_the_datasets_package(tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(BatchInferenceError, match="pip install datasets"):
            HFDatasetSource("some/dataset:validation")
        return
    rows = [Image.fromarray(generate_scene(i, size=32).image) for i in range(3)]
    datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    source = HFDatasetSource(str(tmp_path / "ds"))
    items = source.items()
    assert [i.key for i in items] == ["train/00000000", "train/00000001", "train/00000002"]
    assert source.open(items[1]).size == (32, 32)


def test_command_line_input_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(generate_scene(0, size=32).image).save(image)
    cases = [
        (["segment", str(image), "--input_dir", str(tmp_path)], "not both"),
        (["segment"], "give IMAGE files"),
        (["segment", "--input_dir", str(tmp_path / "missing")], "is not a folder"),
        (["segment", "--input_list", str(tmp_path / "missing.txt")], "is not a file"),
        (["segment", "--input_dir", str(tmp_path / "empty_dir")], "no input images found"),
        (["segment", "--input_dir", str(tmp_path / "empty_dir")], "no input images found"),  # --out was released
    ]
    (tmp_path / "empty_dir").mkdir()
    try:
        import datasets  # noqa: F401
    except ImportError:
        cases.append((["segment", "--dataset", "user/photos:validation"], "pip install datasets"))
    for argv, message in cases:
        assert cli.main([*argv, "-p", "circle", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


def test_bad_options_are_refused_before_any_image(tmp_path):
    Image.fromarray(generate_scene(0, size=32).image).save(tmp_path / "a.png")
    bad = [
        ({"prompts": []}, "non-empty"), ({"prompts": ["circle", " "]}, "non-empty"),
        ({"prompts": ["circle"], "label_png": "jpeg"}, "label_png"),
        ({"prompts": [f"class {i}" for i in range(300)], "label_png": "palette"}, "16bit"),
        ({"prompts": ["circle"], "output_format": "yolo"}, "--format"),
    ]  # fmt: skip
    with DatasetRun(FolderSource(tmp_path), tmp_path / "out") as run:
        for options, message in bad:
            with pytest.raises(BatchInferenceError, match=message):
                run.run(None, BatchOptions(**options))  # refused before the pipeline is touched
    assert not list((tmp_path / "out").glob("*.json"))


# ------------------------------------------------------------------------------------------------- dataset runs


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 synthetic scenes (two sizes, two folders) and one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i in range(12):
        size = 64 if i % 3 else 48
        Image.fromarray(generate_scene(100 + i, size=size).image).save(root / ("sub" if i % 2 else ".") / f"scene{i:02d}.png")
    (root / "broken.png").write_bytes(b"this is not a PNG")
    return root


def _segment_argv(image_folder, out, *extra):
    return [
        "segment", "--input_dir", str(image_folder), *sum((["-p", p] for p in PROMPTS), []), "--out", str(out),
        "--batch_images", "3", "--format", "coco", "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def _results(out: Path) -> dict:
    return {
        str(p.relative_to(out)): json.loads(p.read_text())
        for p in out.rglob("*.json")
        if p.name not in (SUMMARY_NAME, COCO_NAME, "digseg_run.json")
    }


def _check_consistent(out: Path, document: dict) -> None:
    """A result's label map, segments and RLE agree: label k + 1 lies inside prompt k's mask (the label map takes
    the best prompt above the same threshold), and each RLE has its segment's area and box."""
    labels = np.asarray(Image.open(out / document["label_map"]))
    assert labels.shape == (document["height"], document["width"]) and labels.max() <= len(PROMPTS)
    assert document["labels"] == ["background", *PROMPTS]
    by_id = {s["label_id"]: s for s in document["segments"]}
    for k in range(1, len(PROMPTS) + 1):
        region = labels == k
        if k not in by_id:
            assert not region.any()
            continue
        mask = _decode(by_id[k]["segmentation"])
        assert mask.sum() == by_id[k]["area"] and mask_bbox(mask) == by_id[k]["bbox"]
        assert not (region & ~mask).any()
        assert 0.7 < by_id[k]["score"] <= 1.0


def test_dataset_run_writes_results_lists_failures_and_resumes(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_segment_argv(image_folder, out)) == 0
    printed = capsys.readouterr().out
    assert "12 segmented" in printed and "1 failed" in printed and "broken.png" in printed
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert (summary["images"], summary["segmented"], summary["failed"]) == (13, 12, 1)
    assert summary["failures"][0]["image"].endswith("broken.png") and "cannot read image" in summary["failures"][0]["reason"]
    results = _results(out)
    assert sorted(results) == sorted([f"scene{i:02d}.json" for i in range(0, 12, 2)] + [f"sub/scene{i:02d}.json" for i in range(1, 12, 2)])
    for document in results.values():
        _check_consistent(out, document)
    coco = json.loads((out / COCO_NAME).read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(d["source"] for d in results.values())
    assert len(coco["annotations"]) == sum(len(d["segments"]) for d in results.values())
    assert [c["name"] for c in coco["categories"]] == PROMPTS

    # A second run finds every result complete: nothing is rewritten, the COCO file is merged again from them.
    stamps = {name: (out / name).stat().st_mtime_ns for name in results}
    assert cli.main(_segment_argv(image_folder, out)) == 0
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert (summary["segmented"], summary["skipped_complete"], summary["failed"]) == (0, 12, 1)
    assert {name: (out / name).stat().st_mtime_ns for name in results} == stamps
    assert json.loads((out / COCO_NAME).read_text()) == coco

    # Other settings into the same folder are refused, naming what differs.
    assert cli.main(_segment_argv(image_folder, out, "--threshold", "0.5")) == 2
    assert "threshold" in capsys.readouterr().err


def test_leftover_temporaries_of_a_killed_run_are_removed_and_other_files_refused(image_folder, tmp_path, capsys):
    """Issue 31: a run killed mid-write left hidden `.<name>.png.<hex>.tmp` files that no later run removed; and an
    --out that holds someone's files (here: the input folder itself) was written into."""
    out = tmp_path / "out"
    argv = _segment_argv(image_folder, out)
    argv[argv.index("coco")] = "png"
    assert cli.main(argv) == 0
    leftovers = [out / ".scene00.png.0123456789ab.tmp", out / "sub" / ".scene01.json.abcdef012345.tmp"]
    for path in leftovers:
        path.write_bytes(b"half written")
    (out / ".my_notes.tmp").write_text("not a digseg temporary")
    assert cli.main(argv) == 0
    assert not any(path.exists() for path in leftovers) and (out / ".my_notes.tmp").read_text() == "not a digseg temporary"

    copy = tmp_path / "photos"
    copy.mkdir()
    Image.fromarray(generate_scene(0, size=32).image).save(copy / "a.png")
    before = (copy / "a.png").read_bytes()
    assert cli.main(["segment", "--input_dir", str(copy), "-p", "circle", "--out", str(copy), "--device", "cpu", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "not digseg results (a.png)" in error and "--overwrite" in error and error.count("\n") == 1
    assert (copy / "a.png").read_bytes() == before and sorted(p.name for p in copy.iterdir()) == ["a.png"]


def test_coco_file_loads_with_pycocotools(image_folder, tmp_path):
    from digseg_diffusers.pipeline_digseg import DiGSegPipeline

    pipe = DiGSegPipeline.from_pretrained("digseg-demo")
    pipe.set_progress_bar_config(disable=True)
    with DatasetRun(FolderSource(image_folder), tmp_path / "out") as run:
        run.run(pipe, BatchOptions(prompts=PROMPTS, batch_images=4, output_format="coco", progress=False))
    dataset = coco_api.COCO(str(tmp_path / "out" / COCO_NAME))
    results = _results(tmp_path / "out")
    assert len(dataset.getImgIds()) == len(results) == 12
    for annotation in dataset.loadAnns(dataset.getAnnIds()):
        image = dataset.loadImgs(annotation["image_id"])[0]
        document = results[str(Path(image["file_name"]).with_suffix(".json"))]
        segment = next(s for s in document["segments"] if s["label_id"] == annotation["category_id"])
        np.testing.assert_array_equal(dataset.annToMask(annotation).astype(bool), _decode(segment["segmentation"]))


KILL_AFTER_FIVE = """
import os, signal, sys
from digseg_diffusers.inference import batch as batch_inference
from digseg_diffusers.inference import cli
written, real = [], batch_inference.atomic_write_json
def write(path, document):
    if isinstance(document, dict) and document.get("status") == "complete":
        written.append(path)
        if len(written) == 5:  # the 5th image's PNG is on disk, its JSON is not: killed mid-image
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, document)
batch_inference.atomic_write_json = write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_run_resumes_on_two_processes_segmenting_each_image_once(image_folder, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIVE, *_segment_argv(image_folder, out)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _results(out)
    assert len(before) == 4 and not (out / SUMMARY_NAME).exists()
    stamps = {name: (out / name).stat().st_mtime_ns for name in before}

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
        "-m", "digseg_diffusers.inference.cli", *_segment_argv(image_folder, out),
    ]  # fmt: skip
    resumed = subprocess.run(command, env=dict(env, ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["num_processes"] == 2 and summary["skipped_complete"] == 4 and summary["failed"] == 1
    per_process = [s["segmented"] for s in summary["per_process"]]
    assert min(per_process) > 0 and sum(per_process) == summary["segmented"] == 8
    after = _results(out)
    assert len(after) == 12
    assert {name: (out / name).stat().st_mtime_ns for name in before} == stamps  # finished images not redone
    writers = [d["written_by"] for name, d in after.items() if name not in before]
    assert sorted(w["process_index"] for w in writers) == sorted(i for i, n in enumerate(per_process) for _ in range(n))
    assert all(w["num_processes"] == 2 for w in writers) and all(d["written_by"]["num_processes"] == 1 for d in before.values())
    for document in after.values():
        _check_consistent(out, document)
    coco = json.loads((out / COCO_NAME).read_text())  # merged from both processes, earlier results included
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(d["source"] for d in after.values())
    assert len({i["id"] for i in coco["images"]}) == 12 and len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


# ------------------------------------------------------------------------------------------- batches of arrays


def _agreement(a, b) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_batch_segmenter_mixed_sizes_match_single_image_calls():
    segmenter = BatchSegmenter("digseg-demo", PROMPTS, device="cpu")
    images = [generate_scene(200 + i, size=48 if i % 2 else 64).image for i in range(4)]
    batch = segmenter({"image": images, "path": [f"{i}.png" for i in range(4)]})
    assert batch["path"] == [f"{i}.png" for i in range(4)] and len(batch["label_map"]) == 4
    for i, image in enumerate(images):
        alone = segmenter.pipe(image, PROMPTS, generator=row_generators(1, len(PROMPTS), 0), output_type="np")
        assert batch["label_map"][i].dtype == np.uint16 and batch["label_map"][i].shape == image.shape[:2]
        assert _agreement(batch["label_map"][i], alone.label_maps[0]) > 0.99  # other batch, other kernels: ~ulp
        records = json.loads(batch["segments"][i])
        assert [r["label"] for r in records] == [s["label"] for s in alone.to_segments(0)]
        for record in records:
            assert _decode(record["segmentation"]).sum() == record["area"]


@pytest.mark.slow
def test_ray_data_map_batches_recipe(tmp_path):
    """The recipe of docs/dataset_inference.md (runs only where ray[data] is installed; it is not a dependency)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    for i in range(4):
        Image.fromarray(generate_scene(300 + i, size=48 if i % 2 else 64).image).save(tmp_path / f"s{i}.png")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the actor takes one, reading another
    try:
        ds = ray.data.read_images(str(tmp_path), include_paths=True, mode="RGB")
        ds = ds.map_batches(
            BatchSegmenter, fn_constructor_kwargs={"model": "digseg-demo", "prompts": PROMPTS, "device": "cpu"},
            batch_size=4, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy",
        )  # fmt: skip
        rows = ds.drop_columns(["image"]).take_all()
    finally:
        ray.shutdown()
    assert sorted(Path(r["path"]).name for r in rows) == [f"s{i}.png" for i in range(4)]
    for row in rows:
        size = 48 if int(Path(row["path"]).stem[1]) % 2 else 64
        assert np.asarray(row["label_map"]).shape == (size, size)
        assert all(r["label"] in PROMPTS for r in json.loads(row["segments"]))
