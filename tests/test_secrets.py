"""`--hub_token` never reaches a tracker, a card or a saved file."""

import sys
from pathlib import Path

import pytest

from digseg_diffusers.hub.cards import public_training_config
from digseg_diffusers.data.synthetic import write_dataset
from digseg_diffusers.testing_utils import make_tiny_pipeline

SCRIPT = Path(__file__).resolve().parent.parent / "training" / "train_adapter.py"
TOKEN = "hf_NotARealTokenButShapedLikeOne0123456789"


def test_public_training_config_drops_secret_like_arguments():
    args = {"hub_token": TOKEN, "wandb_api_key": "k", "hub_model_id": "me/x", "learning_rate": 1e-3, "levels": [1, 2]}
    assert public_training_config(args) == {"hub_model_id": "me/x", "learning_rate": 1e-3, "levels": [1, 2]}
    assert public_training_config(args, scalars_only=True) == {"hub_model_id": "me/x", "learning_rate": 1e-3}


@pytest.mark.slow
def test_training_run_keeps_the_hub_token_out_of_trackers_cards_and_files(tmp_path, monkeypatch):
    from accelerate import Accelerator

    tracked = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, **kw: tracked.append(config))
    monkeypatch.setattr(Accelerator, "log", lambda self, *args, **kwargs: None)
    write_dataset(tmp_path / "data", "train", num_images=4, size=64)
    make_tiny_pipeline().save_pretrained(tmp_path / "base")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import train_adapter

    train_adapter.main([
        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--train_data_dir", str(tmp_path / "data"),
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1", "--checkpointing_steps", "1",
        "--output_dir", str(tmp_path / "out"), "--report_to", "tensorboard", "--hub_token", TOKEN,
        "--hub_model_id", "someone/digseg-test",
    ])  # fmt: skip
    assert len(tracked) == 1 and "hub_token" not in tracked[0] and TOKEN not in repr(tracked[0])
    assert tracked[0]["hub_model_id"] == "someone/digseg-test"  # the rest of the config is still logged
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files)
    leaking = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaking, f"the token was written to {leaking}"
    sys.modules.pop("train_adapter", None)
