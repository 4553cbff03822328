"""The UniMed-CLIP file as published: numpy 1 globals, a training checkpoint around the tower, read lean and safely."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medsight.model.checkpoints import CheckpointError, read_vision_state, safe_torch_load
from medsight.model.unpickling import main as convert_main
from medsight_testing.unimed_clip import pickled_globals, save_like_numpy1, unimed_clip_checkpoint

# What the Hub's pickle scan lists for unimed_clip_vit_l14_base_text_encoder.pt.
REAL_FILE_GLOBALS = {"_codecs.encode", "numpy.core.multiarray.scalar", "torch.FloatStorage",
                     "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "numpy.dtype"}


def tower(golden: Path) -> dict[str, torch.Tensor]:
    clip = torch.load(golden / "vision_encoder_clip.pt", weights_only=True)
    return {k[len("visual."):]: v for k, v in clip.items() if k.startswith("visual.")}


def text_tower(width: int) -> dict[str, torch.Tensor]:
    return {"embeddings.word_embeddings.weight": torch.randn(100, width),
            "encoder.layer.0.attention.self.query.weight": torch.randn(width, width)}


def test_numpy1_training_checkpoint_loads_only_the_visual_tensors(golden, tmp_path):
    visual = tower(golden)
    path = save_like_numpy1(unimed_clip_checkpoint(visual, text_tower(32)), tmp_path / "unimed_clip.pt")
    assert pickled_globals(path) == REAL_FILE_GLOBALS  # the names are literally in the pickle
    state = read_vision_state(path)
    assert state.keys() == visual.keys()
    assert max((state[k] - visual[k]).abs().max().item() for k in visual) == 0.0
    # The numpy float really was rebuilt (the allow-list, not a skip).
    assert float(safe_torch_load(path)["best_zero_shot"]) == pytest.approx(0.7321)


def test_legacy_format_file_loads_without_memory_map(golden, tmp_path):
    """Files from torch < 1.6 are not zip archives and cannot be memory-mapped; they load the plain way."""
    visual = tower(golden)
    path = tmp_path / "legacy.pt"
    torch.save(unimed_clip_checkpoint(visual, text_tower(8)), path, _use_new_zipfile_serialization=False)
    assert read_vision_state(path).keys() == visual.keys()


def test_a_global_outside_the_allow_list_is_refused_by_name(golden, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = unimed_clip_checkpoint(tower(golden), text_tower(8))
    checkpoint["hook"] = Payload()
    path = save_like_numpy1(checkpoint, tmp_path / "evil.pt")
    offender = f"{os.system.__module__}.{os.system.__name__}"
    assert offender in pickled_globals(path)
    with pytest.raises(CheckpointError) as err:
        read_vision_state(path)
    message = str(err.value)
    assert f"names {offender}," in message and "nothing in it was run" in message
    # The way forward keeps the default: convert the trusted file once, then it loads under the allow-list.
    assert "weights_only=False" not in message and "python -m medsight.model.unpickling" in message
    assert not marker.exists()

    clean = save_like_numpy1(unimed_clip_checkpoint(tower(golden), text_tower(8)), tmp_path / "trusted.pt")
    assert convert_main([str(clean), str(tmp_path / "trusted.safetensors")]) == 0
    assert read_vision_state(tmp_path / "trusted.safetensors").keys() == tower(golden).keys()


PEAK_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from medsight.model.checkpoints import read_vision_state

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak resident size (VmHWM) to its current size
    before = status("VmRSS")
    state = read_vision_state(sys.argv[1])
    print(json.dumps({"peak": status("VmHWM") - before, "kept": sum(v.nbytes for v in state.values())}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak-RSS reset needs Linux /proc")
def test_peak_memory_is_a_small_multiple_of_the_tower_not_of_the_file(tmp_path):
    """The non-visual part (text tower + Adam state) is 20x the tower; reading the tower stays under 3x it."""
    visual = {f"transformer.resblocks.{i}.mlp.c_fc.weight": torch.randn(1024, 1024) for i in range(8)}
    visual_bytes = sum(v.nbytes for v in visual.values())
    # Adam keeps two moments per parameter: non_visual = text + 2 * (visual + text) = 20 * visual => text = 6 * visual.
    text = {f"layer.{i}.weight": torch.randn(1024, 1024) for i in range(6 * len(visual))}
    checkpoint = unimed_clip_checkpoint(visual, text)
    path = save_like_numpy1(checkpoint, tmp_path / "big.pt")
    non_visual = path.stat().st_size - visual_bytes
    assert non_visual >= 20 * visual_bytes
    del checkpoint, text

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    assert measured["kept"] == visual_bytes
    assert measured["peak"] < 3 * visual_bytes, f"peak {measured['peak'] / 2**20:.0f} MiB for a " \
        f"{visual_bytes / 2**20:.0f} MiB tower in a {path.stat().st_size / 2**20:.0f} MiB file"


def test_the_converter_reports_bad_input_in_one_line(golden, tmp_path, capsys):
    """`python -m medsight.model.unpickling`, the command refusals advise, gave tracebacks for a missing, damaged or
    unwritable file."""
    (tmp_path / "page.pt").write_text("<!DOCTYPE html><html>rate limited</html>")
    clean = save_like_numpy1(unimed_clip_checkpoint(tower(golden), text_tower(8)), tmp_path / "trusted.pt")
    cases = ((tmp_path / "absent.pt", tmp_path / "a.safetensors", "checkpoint file not found: "),
             (tmp_path, tmp_path / "d.safetensors", f"{tmp_path} is a folder; expected the checkpoint file"),
             (tmp_path / "page.pt", tmp_path / "b.safetensors", "page.pt: not a readable PyTorch checkpoint ("),
             (clean, tmp_path / "no_such_folder" / "c.safetensors", "cannot write "))
    for source, target, expected in cases:
        assert convert_main([str(source), str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err


def test_the_converter_runs_as_a_module_without_a_runpy_warning(golden, tmp_path):
    """The package imported medsight.model.unpickling before `python -m` ran it: runpy warned of 'unpredictable
    behaviour' on every conversion."""
    clean = save_like_numpy1(unimed_clip_checkpoint(tower(golden), text_tower(8)), tmp_path / "trusted.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-W", "default", "-m", "medsight.model.unpickling", str(clean),
                          str(tmp_path / "trusted.safetensors")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr and "Warning" not in out.stderr, out.stderr
    assert read_vision_state(tmp_path / "trusted.safetensors").keys() == tower(golden).keys()
