"""Evaluation: per-setting accumulators, the open-vocabulary protocol, and training/evaluate.py end to end."""

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

from digseg_diffusers.data.readers import BACKGROUND_INDEX, build_reader
from digseg_diffusers.evaluation.runner import (
    EvaluationAccumulator,
    EvaluationSetting,
    card_metrics,
    evaluate_example,
    evaluate_examples,
    load_partial,
    save_partial,
)
from digseg_diffusers.hub.cards import card_metadata
from digseg_diffusers.data.synthetic import write_dataset
from digseg_diffusers.testing_utils import make_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("digseg_evaluate_script", REPO / "training" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    make_tiny_pipeline().save_pretrained(root / "pipe")
    write_dataset(root / "data", "val", num_images=3, size=32)
    return root


def base_argv(workspace, output, *extra):
    return [
        "--pipeline", str(workspace / "pipe"), "--dataset_root", str(workspace / "data"), "--split", "val",
        "--processing_resolution", "32", "--output_dir", str(output), *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------- settings


def test_setting_parse():
    assert EvaluationSetting.parse("4x2") == EvaluationSetting(4, 2)
    assert EvaluationSetting.parse("1X10").name == "1x10"
    for bad in ("4", "0x1", "ax2", "2x-1"):
        with pytest.raises(ValueError, match="ENSEMBLExSTEPS"):
            EvaluationSetting.parse(bad)


# ---------------------------------------------------------------------------------------------------- accumulator


def test_accumulator_open_vocabulary_counts_unproposed_classes_as_misses():
    # classes: 0 "a", 1 "b"; label: a a / b bg; ignore one pixel
    label = np.array([[0, 0, 255], [1, BACKGROUND_INDEX, 1]])
    acc = EvaluationAccumulator(["a", "b"], ignore_index=255, include_background=True, thresholds=[0.5])
    # only "a" proposed (prompt 0 -> class 0); the pipeline labels: a a a / a bg bg
    probabilities = np.array([[[0.9, 0.8, 0.9], [0.6, 0.1, 0.2]]])
    label_map = np.array([[1, 1, 1], [1, 0, 0]])
    acc.add(label, [0], probabilities, label_map, seconds=2.0)
    cm = acc.confusion.matrix.numpy()
    # rows: gt a, b, background; columns: predicted a, b, background
    np.testing.assert_array_equal(cm, [[2, 0, 0], [1, 0, 1], [0, 0, 1]])
    result = acc.compute()
    assert result["per_class"]["a"]["iou"] == pytest.approx(2 / 3)  # TP 2, FP 1 (b pixel)
    assert result["per_class"]["b"]["iou"] == 0.0
    # curve at t=0.5: "a" -> prob>0.5 on a,a,(b) => I=2, U=3; "b" (not proposed, present) -> I=0, U=2
    np.testing.assert_array_equal(acc.curve.counts[:, 0].numpy(), [[2, 3], [0, 2]])
    assert result["proposal"] == {
        "mean_classes_per_image": 1.0, "recall": 0.5, "precision": 1.0, "images_without_proposal": 0
    }  # fmt: skip
    assert result["seconds_per_image"] == 2.0 and result["num_images"] == 1


def test_accumulator_foreground_iou_and_no_curve_without_probabilities():
    # the example above, scored without a curve: no probability maps needed, the same confusion matrix
    label = np.array([[0, 0, 255], [1, BACKGROUND_INDEX, 1]])
    acc = EvaluationAccumulator(["a", "b"], ignore_index=255, include_background=True, thresholds=())
    acc.add(label, [0], None, np.array([[1, 1, 1], [1, 0, 0]]))
    np.testing.assert_array_equal(acc.confusion.matrix.numpy(), [[2, 0, 0], [1, 0, 1], [0, 0, 1]])
    result = acc.compute()
    assert "iou_vs_threshold" not in result and acc.state_dict()["curve"].numel() == 0
    # foreground (a or b) vs background: hits 3 (a, a, b->a), misses 1 (b->bg), false alarms 0
    assert result["foreground_iou"] == pytest.approx(3 / 4)
    restored = EvaluationAccumulator(["a", "b"], ignore_index=255, include_background=True, thresholds=())
    restored.merge_state_dict(acc.state_dict())
    assert torch.equal(restored.confusion.counts, acc.confusion.counts)


def test_accumulator_checks_the_probability_maps():
    acc = EvaluationAccumulator(["a", "b"], ignore_index=255, thresholds=[0.5])
    with pytest.raises(ValueError, match="one map per segmented class"):
        acc.add(np.zeros((2, 2), dtype=np.int64), [0, 1], np.zeros((1, 2, 2)), np.zeros((2, 2), dtype=np.int64))


def test_accumulator_empty_proposal_is_background_everywhere():
    label = np.array([[0, BACKGROUND_INDEX]])
    acc = EvaluationAccumulator(["a"], ignore_index=255, include_background=True, thresholds=[0.5])
    acc.add(label, [], None, None)
    np.testing.assert_array_equal(acc.confusion.matrix.numpy(), [[0, 1], [0, 1]])
    result = acc.compute()
    assert result["proposal"]["images_without_proposal"] == 1
    assert result["binary"]["recall"] == 0.0  # one class: binary scores of that class


def test_accumulator_without_background_class_counts_background_as_no_class():
    label = np.array([[0, 1, 255]])
    acc = EvaluationAccumulator(["a", "b"], ignore_index=255, include_background=False, thresholds=[0.5])
    acc.add(label, [0, 1], np.zeros((2, 1, 3)), np.array([[1, 0, 2]]))
    assert acc.confusion.counts.tolist() == [[1, 0, 0], [0, 0, 1]]  # "b" predicted as background: unassigned


def test_accumulator_state_roundtrip_and_merge():
    rng = np.random.default_rng(0)
    accs = []
    for seed in range(2):
        acc = EvaluationAccumulator(["a", "b", "c"], 255, True, thresholds=[0.3, 0.7])
        label = rng.integers(-1, 3, (4, 5))
        acc.add(label, [0, 2], rng.random((2, 4, 5)), rng.integers(0, 3, (4, 5)), seconds=1.0 + seed)
        accs.append(acc)
    merged = EvaluationAccumulator(["a", "b", "c"], 255, True, thresholds=[0.3, 0.7])
    for acc in accs:
        merged.merge_state_dict(acc.state_dict())
    assert torch.equal(merged.confusion.counts, accs[0].confusion.counts + accs[1].confusion.counts)
    assert torch.equal(merged.curve.counts, accs[0].curve.counts + accs[1].curve.counts)
    assert merged.num_images == 2 and float(merged.seconds) == 3.0
    restored = EvaluationAccumulator(["a", "b", "c"], 255, True, thresholds=[0.3, 0.7])
    restored.load_state_dict(merged.state_dict())
    assert json.dumps(restored.compute()) == json.dumps(merged.compute())  # NaN-safe comparison
    with pytest.raises(ValueError, match="shape"):
        EvaluationAccumulator(["a"], 255, True, thresholds=[0.5]).load_state_dict(merged.state_dict())


def test_partial_checkpoint_roundtrip_and_fingerprint(tmp_path):
    setting = EvaluationSetting(1, 1)
    acc = EvaluationAccumulator(["a"], 255, True, thresholds=[0.5])
    acc.add(np.array([[0, -1]]), [0], np.array([[[0.9, 0.1]]]), np.array([[1, 0]]))
    save_partial(tmp_path / "shard.pt", 7, {setting: acc}, {"seed": 0})
    fresh = {setting: EvaluationAccumulator(["a"], 255, True, thresholds=[0.5])}
    assert load_partial(tmp_path / "shard.pt", fresh, {"seed": 0}) == 7
    assert torch.equal(fresh[setting].confusion.counts, acc.confusion.counts)
    assert load_partial(tmp_path / "missing.pt", fresh, {"seed": 0}) == 0
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        load_partial(tmp_path / "shard.pt", fresh, {"seed": 1})


def test_card_metrics_feed_the_model_index():
    metrics = card_metrics({"mIoU": 0.5, "pixel_accuracy": 0.75, "mean_accuracy": None, "mean_dice": 0.6})
    assert metrics == {"mIoU": 0.5, "pixel_accuracy": 0.75, "mean_dice": 0.6}
    index = card_metadata("base", "user/model", "synthetic", metrics)["model-index"][0]
    assert {m["type"] for m in index["results"][0]["metrics"]} == {"mean_iou", "overall_accuracy", "mean_dice"}


# ------------------------------------------------------------------------------------------ protocols on a pipeline


class FixedProposer:
    def __init__(self, proposals):
        self.proposals = proposals
        self.calls = 0

    def propose(self, image, class_names):
        self.calls += 1
        return [list(self.proposals)]


def test_closed_protocol_matches_evaluate_examples(tiny_pipe, workspace):
    reader = build_reader("folder", workspace / "data", "val")
    examples = [reader.load_validation_example(i) for i in range(2)]
    reference = evaluate_examples(tiny_pipe, examples, reader.class_names, processing_resolution=32)
    setting = EvaluationSetting(1, 1)
    accumulators = {setting: EvaluationAccumulator(reader.class_names, reader.ignore_index, True)}
    for index, example in enumerate(examples):
        evaluate_example(tiny_pipe, example, index, accumulators, reader.class_names, processing_resolution=32)
    assert torch.equal(accumulators[setting].confusion.counts, reference.counts)


def test_open_protocol_segments_only_proposed_classes(tiny_pipe, workspace):
    reader = build_reader("folder", workspace / "data", "val")
    example = reader.load_validation_example(0)
    settings = {
        EvaluationSetting.parse(name): EvaluationAccumulator(reader.class_names, reader.ignore_index, True)
        for name in ("1x1", "2x1")
    }
    proposer = FixedProposer(["star", "circle"])
    segmented = evaluate_example(
        tiny_pipe, example, 0, settings, reader.class_names, proposer=proposer, processing_resolution=32
    )
    assert segmented == [reader.class_names.index("star"), reader.class_names.index("circle")]
    assert proposer.calls == 1  # one proposal shared by every setting
    for accumulator in settings.values():
        predicted_columns = accumulator.confusion.matrix.sum(dim=0)
        never = [k for k in range(len(reader.class_names)) if k not in segmented]
        assert int(predicted_columns[never].sum()) == 0  # unproposed classes are never predicted

    empty = {EvaluationSetting(1, 1): EvaluationAccumulator(reader.class_names, reader.ignore_index, True)}
    evaluate_example(tiny_pipe, example, 0, empty, reader.class_names, proposer=FixedProposer([]))
    counts = next(iter(empty.values())).confusion.matrix
    assert int(counts[:, :-1].sum()) == 0 and int(counts[:, -1].sum()) == example.label.size


# ------------------------------------------------------------------------------------------------------ the script


def test_script_end_to_end_writes_json_markdown_and_plots(workspace, tmp_path):
    script = load_script()
    results = script.main(base_argv(workspace, tmp_path / "out", "--settings", "1x1", "2x1"))
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"evaluation.json", "evaluation.md", "iou_vs_threshold.png", "per_class_iou_1x1.png"} <= files
    assert "per_class_iou_2x1.png" in files
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["protocol"] == "closed-vocabulary" and saved["dataset"]["num_images"] == 3
    assert list(saved["settings"]) == ["1x1", "2x1"] and saved["primary_setting"] == "1x1"
    one = saved["settings"]["1x1"]
    assert {"mIoU", "pixel_accuracy", "mean_dice", "per_class", "iou_vs_threshold", "seconds_per_image"} <= set(one)
    assert set(one["per_class"]) == set(saved["dataset"]["class_names"]) | {"background"}
    assert one["num_pixels"] == 3 * 32 * 32 and one["num_images"] == 3
    assert saved["card_metrics"]["mIoU"] == pytest.approx(one["mIoU"])
    assert card_metadata(None, "m", "synthetic", saved["card_metrics"])["model-index"]
    report = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| 1x1 |" in report and "| 2x1 |" in report and "closed vocabulary" in report
    with Image.open(tmp_path / "out" / "iou_vs_threshold.png") as plot:
        assert plot.size == (640, 420)
    with Image.open(tmp_path / "out" / "per_class_iou_1x1.png") as plot:
        assert plot.height > 8 * 18  # one bar per class (7 + background)

    with pytest.raises(FileExistsError, match="--resume"):
        script.main(base_argv(workspace, tmp_path / "out"))


def test_script_resume_skips_finished_images(workspace, tmp_path, monkeypatch):
    script = load_script()
    full = script.main(base_argv(workspace, tmp_path / "full", "--checkpoint_every", "1"))

    calls = []
    real = script.evaluate_example

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(script, "evaluate_example", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.main(base_argv(workspace, tmp_path / "out", "--checkpoint_every", "1"))
    assert calls == [0, 1]

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(script, "evaluate_example", counting)
    resumed = script.main(base_argv(workspace, tmp_path / "out", "--checkpoint_every", "1", "--resume"))
    assert calls == [0, 1, 2]  # only the third image was evaluated again
    for key in ("mIoU", "pixel_accuracy", "per_class", "iou_vs_threshold"):
        assert resumed["settings"]["1x1"][key] == full["settings"]["1x1"][key]

    script.main(base_argv(workspace, tmp_path / "out", "--resume"))  # all done: nothing evaluated
    assert calls == [0, 1, 2]
    with pytest.raises(ValueError, match="another evaluation"):
        script.main(base_argv(workspace, tmp_path / "out", "--resume", "--seed", "3"))


def test_script_open_vocabulary_with_saved_proposer(workspace, tmp_path):
    from digseg_diffusers.testing_utils import make_tiny_clip_model as make_tiny_clip

    from digseg_diffusers.proposal import DiGSegClassProposer
    from digseg_diffusers.tokenization import build_char_clip_tokenizer

    proposer = DiGSegClassProposer(make_tiny_clip(), build_char_clip_tokenizer(), global_threshold=-1.0, top_k=2)
    proposer.save_pretrained(tmp_path / "proposer")
    script = load_script()
    results = script.main(base_argv(workspace, tmp_path / "out", "--proposer", str(tmp_path / "proposer")))
    assert results["protocol"] == "open-vocabulary" and results["proposer"]["top_k"] == 2
    proposal = results["settings"]["1x1"]["proposal"]
    assert proposal["mean_classes_per_image"] == 2.0 and 0.0 <= proposal["recall"] <= 1.0
    assert "## Class proposal" in (tmp_path / "out" / "evaluation.md").read_text()


def test_script_argument_errors(workspace, tmp_path):
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(base_argv(workspace, tmp_path, "--settings", "4by2"))
    with pytest.raises(SystemExit):
        script.parse_args(base_argv(workspace, tmp_path, "--resume", "--overwrite"))
    with pytest.raises(ValueError, match="no saved class proposer"):
        script.main(base_argv(workspace, tmp_path / "out", "--proposer", "pipeline"))


@pytest.mark.slow
def test_two_processes_give_the_same_confusion_matrix(workspace, tmp_path):
    # The reference runs on one thread, like each launched process: the same kernels on the same per-image calls,
    # so the label maps (and the confusion matrices counted from them) are those of the same code path.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = load_script().main(base_argv(workspace, tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
        str(REPO / "training" / "evaluate.py"), *base_argv(workspace, tmp_path / "two"),
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert double["num_processes"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "partial").iterdir()) == [
        "shard-000-of-002.pt", "shard-001-of-002.pt"
    ]  # fmt: skip
    for key in ("mIoU", "pixel_accuracy", "num_pixels", "per_class"):  # from the confusion matrix: exact
        assert double["settings"]["1x1"][key] == single["settings"]["1x1"][key]
    # The curve thresholds float probabilities; a pixel within 1 ulp of t could still flip: compare loosely.
    curves = [run["settings"]["1x1"]["iou_vs_threshold"]["mean_iou"] for run in (single, double)]
    assert curves[1] == pytest.approx(curves[0], abs=1e-3, nan_ok=True)


def test_one_call_per_example_scores_every_threshold_like_separate_evaluations():
    from digseg_diffusers.evaluation.runner import evaluate_examples, evaluate_examples_at_thresholds
    from digseg_diffusers.data.synthetic import SHAPE_CLASSES, generate_scene

    pipe = make_tiny_pipeline()
    examples = []
    for seed in (3, 4):
        scene = generate_scene(seed, size=32)
        examples.append(scene.validation_example())
    thresholds = (0.3, 0.5, 0.7)
    together = evaluate_examples_at_thresholds(pipe, examples, SHAPE_CLASSES, thresholds, processing_resolution=32)
    for threshold in thresholds:
        alone = evaluate_examples(pipe, examples, SHAPE_CLASSES, mask_threshold=threshold, processing_resolution=32)
        assert torch.equal(alone.counts, together[threshold].counts)  # same code path for the maps: exact
