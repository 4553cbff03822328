"""Training config values as the user writes them in JSON: what is taken, what is refused, and resuming a run whose
saved config an older version wrote."""

from __future__ import annotations

import json

import pytest

from medsight.train.loop import CONFIG_FILE, check_resume_config
from medsight.train.stages import Stage1Config, Stage3Config


@pytest.mark.parametrize("field", ["lr", "max_steps", "seed", "warmup_ratio"])
def test_true_or_false_is_not_a_number(field):
    """pydantic's lax mode would read true as 1 (a learning rate of 1.0); a boolean is refused for a number field."""
    with pytest.raises(ValueError, match=rf"field '{field}' is true \(true/false\)"):
        Stage1Config.from_dict({field: True})
    assert Stage3Config.from_dict({"bf16": True}).bf16 is True


def test_device_names_are_checked_as_names():
    """A config may be written on a computer without the GPU it names, so only the name is checked."""
    assert Stage3Config.from_dict({"device": "cuda:1"}).device == "cuda:1"
    for name in ("gpu", "xpu"):
        with pytest.raises(ValueError, match=rf"field 'device' is \"{name}\".*cpu, cuda, cuda:N"):
            Stage3Config.from_dict({"device": name})


def test_resume_takes_a_field_the_saved_config_lacks_as_its_default(tmp_path):
    """A newer version adds fields: a run saved before them resumes when they keep their defaults, and is refused
    when the resume changes one."""
    config = Stage3Config(max_steps=4)
    saved = config.to_dict()
    newest = sorted(saved)[-1]
    del saved[newest]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    check_resume_config(tmp_path, config)
    default = config.lr
    with pytest.raises(ValueError, match=r"lr: .* in the run, .* now"):
        check_resume_config(tmp_path, Stage3Config(max_steps=4, lr=default * 2))


def test_resume_knows_a_model_folder_in_either_spelling(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps(Stage3Config(init_from="base").to_dict()))
    check_resume_config(tmp_path / "run", Stage3Config(init_from=str(tmp_path / "base")))
    with pytest.raises(ValueError, match=r"init_from"):
        check_resume_config(tmp_path / "run", Stage3Config(init_from="tiny"))
