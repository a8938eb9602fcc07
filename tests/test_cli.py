"""The `digseg` command line: outputs on disk, JSON summary, and one-line errors with exit code 2."""

import json

import numpy as np
import pytest
from PIL import Image

from digseg_diffusers import cli
from digseg_diffusers.testing_utils import make_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_pipeline(seed=0, default_processing_resolution=64).save_pretrained(path)
    return str(path)


def _save_image(path, size=(64, 64), seed=0):
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_masks_label_map_overlay_and_summary(tmp_path, tiny_model_dir, capsys):
    image = _save_image(tmp_path / "scene.png", size=(48, 40))
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        [
            "segment", image, "--prompt", "circle", "--prompt", "red star", "--model", tiny_model_dir,
            "--out", str(out), "--threshold", "0.4", "--quiet",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "label_map.png", "mask_00_circle.png", "mask_01_red_star.png", "overlay.png", "summary.json"
    ]
    mask = np.asarray(Image.open(out / "mask_01_red_star.png"))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 255}
    label_map = Image.open(out / "label_map.png")
    assert label_map.mode == "P" and label_map.size == (48, 40)
    labels = np.asarray(label_map)
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert np.asarray(Image.open(out / "overlay.png")).shape == (40, 48, 3)

    summary = json.loads((out / "summary.json").read_text())
    assert [p["prompt"] for p in summary["prompts"]] == ["circle", "red star"]
    assert summary["prompts"][1]["mask_area_fraction"] == pytest.approx((mask == 255).mean())
    assert summary["prompts"][0]["label_area_fraction"] == pytest.approx((labels == 1).mean())
    assert summary["segment_seconds"] > 0
    assert "red star" in stdout


def test_segment_several_images_of_different_sizes(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _save_image(tmp_path / "a" / "img.png", size=(64, 64))
    second = _save_image(tmp_path / "b" / "img.png", size=(32, 56), seed=1)  # same stem, other size
    out = tmp_path / "out"
    code, _, stderr = _run(["segment", first, second, "-p", "square", "--model", tiny_model_dir, "-o", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    assert np.asarray(Image.open(out / "img" / "mask_00_square.png")).shape == (64, 64)
    assert np.asarray(Image.open(out / "img_2" / "mask_00_square.png")).shape == (56, 32)
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["image"] for entry in summary["images"]] == [first, second]
    assert summary["settings"]["model"] == tiny_model_dir
    assert summary["timings"]["total_seconds"] >= summary["timings"]["load_model_seconds"]


def test_same_seed_gives_same_masks(tmp_path, tiny_model_dir, capsys):
    image = _save_image(tmp_path / "x.png")
    for name in ("run1", "run2"):
        assert _run(["segment", image, "-p", "ring", "--model", tiny_model_dir, "-o", str(tmp_path / name), "--seed", "3", "--quiet"], capsys)[0] == 0
    first = np.asarray(Image.open(tmp_path / "run1" / "mask_00_ring.png"))
    second = np.asarray(Image.open(tmp_path / "run2" / "mask_00_ring.png"))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda d, m: ["segment", str(d / "missing.png"), "-p", "a", "--model", m, "-o", str(d / "o")], "image not found"),
        (lambda d, m: ["segment", str(d / "broken.png"), "-p", "a", "--model", m, "-o", str(d / "o")], "cannot read image"),
        (lambda d, m: ["segment", str(d / "ok.png"), "-p", "a", "--model", str(d / "no_model"), "-o", str(d / "o")], "cannot load the model"),
        (lambda d, m: ["segment", str(d / "ok.png"), "-p", " ", "--model", m, "-o", str(d / "o")], "--prompt"),
        (lambda d, m: ["segment", str(d / "ok.png"), "-p", "a", "--model", m, "--adapter", str(d / "none"), "-o", str(d / "o")], "cannot load the adapter"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_model_dir, capsys, make_argv, message):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    _save_image(tmp_path / "ok.png")
    code, _, stderr = _run(make_argv(tmp_path, tiny_model_dir), capsys)
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra", [["--threshold", "1.5"], ["--steps", "0"], ["--ensemble", "x"], ["--resolution", "-1"]]
)
def test_bad_arguments_exit_with_code_2(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "img.png", "-p", "a", "-o", str(tmp_path)] + extra)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_unavailable_device_is_a_clean_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, stderr = _run(["segment", _save_image(tmp_path / "ok.png"), "-p", "a", "--model", tiny_model_dir, "-o", str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in stderr


def test_demo_command_with_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, stderr = _run(["demo", "--out", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    present, absent = summary["classes_present"], summary["classes_absent_queried"]
    assert len(absent) == 1 and absent[0] not in present
    assert [p["prompt"] for p in summary["prompts"]] == present + absent
    for name in ("image.png", "ground_truth.png", "label_map.png", "overlay.png", "panel.png"):
        assert (out / name).is_file()
    truth = np.asarray(Image.open(out / "ground_truth.png"))
    prediction = np.asarray(Image.open(out / "label_map.png"))
    assert truth.shape == prediction.shape == (64, 64)
    assert set(np.unique(truth)) == set(range(len(present) + 1))  # every present class is visible
    # the summary's IoU is the one of the written label map; the absent class stays (almost) empty
    present_label = 1 + int(np.argmax([(prediction == k + 1).sum() for k in range(len(present))]))
    name = present[present_label - 1]
    expected = ((prediction == present_label) & (truth == present_label)).sum() / (
        (prediction == present_label) | (truth == present_label)
    ).sum()
    assert summary["iou"][name] == pytest.approx(expected)
    assert summary["iou"][absent[0]] is None or summary["iou"][absent[0]] == 0.0
    # the absent class's mask stays small: 4 % of the image on this scene when the current model was installed,
    # against 22 % for the three present shapes together
    assert summary["prompts"][-1]["mask_area_fraction"] < 0.1
    assert summary["prompts"][-1]["mask_area_fraction"] < sum(p["mask_area_fraction"] for p in summary["prompts"][:-1])
    assert "mIoU" in stdout
