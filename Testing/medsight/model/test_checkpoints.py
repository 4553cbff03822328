"""Official layouts load unchanged; bad checkpoints fail with errors that name the problem."""

import argparse
import json
import os
import re
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from medsight.model.checkpoints import CheckpointError, read_perceiver_state, safe_torch_load
from medsight.model.hub import RELEASE_REPO
from medsight.model.loading import load_model, load_official, load_pretrained, save_pretrained
from medsight_testing.golden import golden_base_config
from medsight_testing.hub_cache import cache_repo, folder_files
from medsight_testing.release import write_release


def load_tiny_release(golden, root, **kwargs):
    return load_official(
        root / "medsight_full_instruct", root / "region_perceiver" / "0079280.pt",
        kwargs.get("vision", root / "unimed_clip_vit_l14.pt"), kwargs.get("codebook"),
        base=golden_base_config(golden),
    )


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_golden_parts(model, golden_model, parts: tuple[str, ...]) -> None:
    """`model`'s `parts` hold the golden model's weights (compared in float32, as loaded; the shared golden model
    goes back to float64 for the other tests)."""
    ref = golden_model.to(torch.float32)
    try:
        for part in parts:
            assert same_weights(getattr(model, part), getattr(ref, part)), part
    finally:
        golden_model.to(torch.float64)


def test_every_layout_variant_loads_the_same_weights(golden, tmp_path, golden_model):
    plain = write_release(golden, tmp_path / "plain", sharded=False, namespace_args=False)
    model = load_tiny_release(golden, plain)
    assert_golden_parts(model, golden_model, ("image_encoder", "region_perceiver", "language_model"))


def test_argparse_namespace_is_allowed_but_nothing_else(tmp_path, release_dir):
    ckpt = safe_torch_load(release_dir / "region_perceiver" / "0079280.pt")
    assert isinstance(ckpt["args"], argparse.Namespace)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": subprocess.Popen}, evil)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        safe_torch_load(evil)


class _RunsACommand:
    """An object whose unpickling would run a shell command (os.system: a module torch blocks outright)."""

    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_blocked_global_is_named_in_either_pickle_format(tmp_path, zip_format):
    # A pre-1.6 (non-zip) pickle naming os.system was called 'damaged or not a checkpoint: unreadable pickle' (safely
    # refused, but the user was told the file is broken, not that it would run code); torch's message for a blocked
    # module differs from the one for a global that is merely not allowed.
    evil = tmp_path / "pytorch_model.bin"
    state = {"lm_head.weight": torch.zeros(1), "x": _RunsACommand()}
    torch.save(state, evil, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=rf"refused to unpickle: it names {os.system.__module__}\.system"):
        safe_torch_load(evil)


def test_missing_extra_and_misshaped_keys_are_named(golden, tmp_path):
    root = write_release(golden, tmp_path / "r", sharded=False)
    path = root / "region_perceiver" / "0079280.pt"
    ckpt = safe_torch_load(path)
    model = ckpt["model"]
    dropped = next(k for k in model if ".bi_blocks." in k)[len("region_perceiver."):]
    model.pop(f"region_perceiver.{dropped}")
    model["region_perceiver.extra_thing"] = torch.zeros(3)
    bias = "region_perceiver.segmentation_cls_head.proj.bias"
    width = model[bias].shape[0]
    model[bias] = torch.zeros(width + 1)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        load_tiny_release(golden, root)
    message = str(err.value)
    assert f"missing key(s): {dropped}" in message
    assert "unexpected key(s): extra_thing" in message
    assert f"segmentation_cls_head.proj.bias: checkpoint ({width + 1},) vs model ({width},)" in message
    assert str(path) in message


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_weight_stored_as_integers_or_booleans_is_named(golden, tmp_path, dtype):
    """A damaged or hand-made UniMed-CLIP file whose weight is not floating point (same shape): load_state_dict's
    RuntimeError ("Only Tensors of floating point ... can require gradients") reached the user as a traceback naming
    neither the file nor the fix. A CheckpointError names both the file and the key."""
    root = write_release(golden, tmp_path / "r", sharded=False)
    path = root / "unimed_clip_vit_l14.pt"
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("ln_post.bias"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key].to(dtype)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        load_tiny_release(golden, root)
    message = str(err.value)
    assert str(path) in message
    assert f"ln_post.bias: checkpoint {str(dtype).removeprefix('torch.')} vs model floating point" in message


def test_a_perceiver_of_another_size_names_its_file(release_dir):
    """The golden (tiny) release loaded with the default base config (the full model's head size): the perceiver's
    attention width is no multiple of that head size. The error said so without naming the file or the base config,
    so the user could not tell which of the release's files was of another size."""
    perceiver = release_dir / "region_perceiver" / "0079280.pt"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(perceiver))}: perceiver attention width \d+ is not a "
                                              rf"multiple of dim_head \d+ \(base config 'full'\)"):
        load_model(release_dir, device="cpu")


def test_a_vision_file_without_a_vit_tensor_names_the_file(golden, tmp_path):
    """A UniMed-CLIP file lacking a tensor the ViT's sizes are read from: the error named the tensor, not the file."""
    root = write_release(golden, tmp_path / "r", sharded=False)
    path = root / "unimed_clip_vit_l14.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["module.visual.proj"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: vision checkpoint lacks 'proj'"):
        load_tiny_release(golden, root)


def test_lvlm_key_errors_are_named(golden, tmp_path):
    root = write_release(golden, tmp_path / "r", sharded=False)
    weights = root / "medsight_full_instruct" / "model.safetensors"
    state = load_file(str(weights))
    del state["model.token_projection.2.bias"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): model.token_projection.2.bias"):
        load_tiny_release(golden, root)


def test_a_tensor_in_two_shards_is_named(golden, tmp_path):
    """Two shards that both hold a tensor (a shard of an older save copied in): the later shard's values were taken
    without a word, whichever the index assigns it to. Refused, naming the tensor and both shards."""
    root = write_release(golden, tmp_path / "r")
    lvlm = root / "medsight_full_instruct"
    first, second = sorted(lvlm.glob("model-*.safetensors"))
    state, other = load_file(str(first)), load_file(str(second))
    name = sorted(state)[0]
    other[name] = state[name] + 1
    save_file(other, str(second))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is in both {first.name} and {second.name}"):
        load_tiny_release(golden, root)


def test_missing_files_give_clear_errors(golden, tmp_path):
    root = write_release(golden, tmp_path / "r")
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*nope\.pt"):
        load_tiny_release(golden, root, vision=root / "nope.pt")
    (root / "medsight_full_instruct" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002\.safetensors named in the index is missing"):
        load_tiny_release(golden, root)
    # Without the index too (copied or downloaded before it): named by the count in the other shards' names, where
    # the shards found were read and the model said to lack their tensors.
    (root / "medsight_full_instruct" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002\.safetensors counted by the other shards' "
                                              r"names is missing"):
        load_tiny_release(golden, root)



def test_ctrl_c_while_weights_are_read_is_an_interrupt_not_a_damaged_file(tmp_path, monkeypatch):
    """Ctrl+C while safetensors read a file (minutes for an 8B model) reached Python inside torch's native code,
    which turned it into its own error: the user was told the weights were "damaged or partly downloaded" (seen
    under torchrun, Ctrl+C during `medsight eval`'s model load)."""
    import os
    import signal
    import time

    from medsight.model import checkpoints

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, path)

    def load_interrupted(name):
        swallowed = False
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the interrupt arrives here
        except KeyboardInterrupt:
            swallowed = True  # what torch's native code does with a pending interrupt: its own error instead
        if swallowed:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
        return load_file(name)

    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(checkpoints, "load_file", load_interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.read_safetensors_file(path)
    assert signal.getsignal(signal.SIGINT) is handler
    monkeypatch.setattr(checkpoints, "load_file", load_file)
    assert checkpoints.read_safetensors_file(path)["w"].shape == (3,)  # no interrupt: read as before


def test_weights_that_are_a_folder_are_named_as_a_folder(golden, tmp_path):
    # A model.safetensors that is a folder (an unpacked archive, a copy gone wrong) was reported as "shard
    # model.safetensors named in the index is missing", in a folder with no index.
    root = write_release(golden, tmp_path / "r", sharded=False)
    weights = root / "medsight_full_instruct" / "model.safetensors"
    assert weights.is_file() and not (weights.parent / "model.safetensors.index.json").exists()
    weights.unlink()
    weights.mkdir()
    with pytest.raises(CheckpointError, match=rf"{weights} is a folder; expected the safetensors weights file"):
        load_tiny_release(golden, root)


@pytest.mark.parametrize("weight_map", [[], "model.safetensors", {"lm_head.weight": 3}])
def test_a_malformed_safetensors_index_is_named(golden, tmp_path, weight_map):
    """An index whose weight_map is no map of names to shard files raised AttributeError / TypeError."""
    root = write_release(golden, tmp_path / "r")
    index = root / "medsight_full_instruct" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"{index}: not a valid safetensors index"):
        load_tiny_release(golden, root)

def test_stage1_ema_layout_skips_the_vit(golden, tmp_path):
    state = torch.load(golden / "perceiver_stage1_ckpt.pt", weights_only=True)["model"]
    vit = torch.load(golden / "vision_encoder_clip.pt", weights_only=True)
    ema = {**state, **{f"image_encoder.{k[7:]}": v for k, v in vit.items() if k.startswith("visual.")}}
    torch.save({"ema": ema, "model": {}, "steps": 1}, tmp_path / "ema.pt")
    assert read_perceiver_state(tmp_path / "ema.pt").keys() == {k[len("region_perceiver."):] for k in state}


def test_vision_tower_inside_the_lvlm_and_stage4_split_embedding(golden, tmp_path, golden_model):
    """Paper-time LVLM saves carry the tower; stage-4 saves split the embedding into base + codebook rows."""
    root = write_release(golden, tmp_path / "r", sharded=False)
    weights = root / "medsight_full_instruct" / "model.safetensors"
    state = load_file(str(weights))
    vit = torch.load(golden / "vision_encoder_clip.pt", weights_only=True)
    for k, v in vit.items():
        if k.startswith("visual."):
            state[f"model.vision_tower.vision_tower.image_encoder.{k[7:]}"] = v
    embed = state.pop("model.embed_tokens.weight")
    first = golden_model.codes.first_id  # the region-code rows follow the base vocabulary
    state["model.embed_tokens.base_emb.weight"] = torch.cat([embed[:first], torch.zeros_like(embed[first:])])
    state["model.embed_tokens.codebook_emb.weight"] = embed[first:].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    model = load_tiny_release(golden, root, vision=None)
    assert torch.equal(model.language_model.get_input_embeddings().weight, embed)
    assert torch.equal(model.image_encoder.conv1.weight, vit["visual.conv1.weight"])


def test_our_format_round_trip(golden, tmp_path, release_dir):
    model = load_tiny_release(golden, release_dir, codebook=release_dir / "codebook" / "0035673.pt")
    save_pretrained(model, tmp_path / "ours")
    again = load_pretrained(tmp_path / "ours")
    assert same_weights(model, again)
    image_size = json.loads((golden / "tiny_vit_openclip_config.json").read_text())["vision_cfg"]["image_size"]
    assert json.loads((tmp_path / "ours" / "medsight_config.json").read_text())["vision"]["image_size"] == image_size
    assert load_model(tmp_path / "ours", device="cpu").config == model.config


def test_hub_repo_id_from_the_offline_cache(golden, release_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache_repo(cache, RELEASE_REPO, folder_files(release_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    base = golden_base_config(golden)
    model = load_model(RELEASE_REPO, device="cpu", base_config=base)
    image_size = json.loads((golden / "tiny_vit_openclip_config.json").read_text())["vision_cfg"]["image_size"]
    assert model.config.vision.image_size == image_size and model.codebook is not None
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache \(.*\) and offline mode is on"):
        load_model("someone/absent-model", device="cpu", base_config=base)


def test_loading_never_runs_arbitrary_code(tmp_path):
    marker = tmp_path / "pwned"
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')"

    class Payload:
        def __reduce__(self):
            return (exec, (code,))

    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        safe_torch_load(tmp_path / "bad.pt")
    assert not marker.exists()
    assert sys.modules.get("subprocess") is not None  # the test itself imported it; loading imported nothing


def test_damaged_and_placeholder_weight_files_are_named(golden, tmp_path):
    """What a first download can leave behind: a partial shard, Git LFS pointers (a clone without LFS), an HTML
    page saved under the file's name; and a folder passed for a file."""
    root = write_release(golden, tmp_path / "r")
    shard = root / "medsight_full_instruct" / "model-00002-of-00002.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: not a readable safetensors file, damaged or partly"):
        load_tiny_release(golden, root)
    shard.write_bytes(whole)
    perceiver = root / "region_perceiver" / "0079280.pt"
    perceiver.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 411000000\n")
    with pytest.raises(CheckpointError, match=r"0079280\.pt is a Git LFS pointer, not the weights.*git lfs pull"):
        load_tiny_release(golden, root)
    write_release(golden, tmp_path / "again")
    (root / "unimed_clip_vit_l14.pt").write_text("<!DOCTYPE html><html><body>Access to this file is restricted")
    (tmp_path / "again" / "region_perceiver" / "0079280.pt").replace(perceiver)
    with pytest.raises(CheckpointError) as err:
        load_tiny_release(golden, root)
    assert "unimed_clip_vit_l14.pt: not a readable PyTorch checkpoint (damaged or not a checkpoint" in str(err.value)
    assert "refused" not in str(err.value)  # nothing was refused: no advice to unpickle it without the allow-list
    with pytest.raises(CheckpointError, match=r"medsight_full_instruct is a folder; expected the checkpoint file"):
        load_tiny_release(golden, root, vision=root / "medsight_full_instruct")


def test_unreadable_configs_and_tokenizers_name_their_file(golden, tmp_path):
    root = write_release(golden, tmp_path / "r", sharded=False)
    lvlm = root / "medsight_full_instruct"
    released = (lvlm / "config.json").read_text()
    (lvlm / "config.json").write_text(released[: len(released) // 2])  # a partial download
    with pytest.raises(CheckpointError, match=r"medsight_full_instruct/config\.json: Expecting"):
        load_tiny_release(golden, root)
    (lvlm / "config.json").write_text(json.dumps({**json.loads(released), "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: config\.json has model_type 'llama'"):
        load_tiny_release(golden, root)
    (lvlm / "config.json").write_text(released)
    (lvlm / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"medsight_full_instruct: the tokenizer files are not readable"):
        load_tiny_release(golden, root)
    ours = save_pretrained(load_model("tiny", device="cpu"), tmp_path / "ours")
    (ours / "medsight_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"ours/medsight_config\.json: not a valid MedSIGHT config"):
        load_model(ours, device="cpu")


def test_a_vision_file_of_another_vit_width_is_named(golden, tmp_path, release_dir):
    """A ViT of another size (a ViT-B file for a ViT-L release) cannot feed the perceiver: the error names the
    vision file and the perceiver file, not only two config fields."""
    clip = safe_torch_load(release_dir / "unimed_clip_vit_l14.pt")["state_dict"]
    width = clip["module.visual.conv1.weight"].shape[0]
    wider = {k: torch.zeros([width + 4 if n == width else n for n in v.shape]) for k, v in clip.items()}
    torch.save({"state_dict": wider}, tmp_path / "vit_other.pt")
    with pytest.raises(CheckpointError) as err:
        load_tiny_release(golden, release_dir, vision=tmp_path / "vit_other.pt")
    assert f"vit_other.pt: a ViT of width {width + 4}, but " in str(err.value)
    assert f"0079280.pt reads features of width {width}" in str(err.value)


def test_a_vocabulary_that_disagrees_with_the_tokenizer_names_the_folder(golden, tmp_path):
    root = write_release(golden, tmp_path / "r", sharded=False)
    config = root / "medsight_full_instruct" / "config.json"
    released = json.loads(config.read_text())
    config.write_text(json.dumps({**released, "vocab_size": released["vocab_size"] + 64}))  # e.g. a padded vocab
    with pytest.raises(CheckpointError, match=r"medsight_full_instruct: its tokenizer and config\.json disagree: "
                                              rf"tokenizer codes end at id {released['vocab_size'] - 1} but"):
        load_tiny_release(golden, root)


def test_a_stage2_file_without_its_codebooks_is_named(golden, tmp_path, release_dir):
    state = torch.load(golden / "codebook_stage2_ckpt.pt", weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in state.items() if ".codebooks." not in k}}, tmp_path / "stage2.pt")
    with pytest.raises(CheckpointError, match=r"stage2\.pt: no codebook tensors \(quantizer\.codebooks\.\*\)"):
        load_tiny_release(golden, release_dir, codebook=tmp_path / "stage2.pt")


def test_a_mistyped_model_source_says_what_it_was_looked_for_as(tmp_path, monkeypatch):
    """`--model runs/final` (one slash) that is no folder was reported only as a Hub repository missing from the
    cache, with advice to download it; a bare word only as 'neither a folder nor a repo id'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"runs/final at revision main: not in the local Hugging Face cache "
                                              rf".*\(nor is there a folder {tmp_path / 'runs' / 'final'}\)"):
        load_model("runs/final", device="cpu")
    with pytest.raises(CheckpointError, match=r"'dmeo' is neither a folder, a built-in model \(demo, full, tiny\) "
                                              r"nor a Hugging Face repo id"):
        load_model("dmeo", device="cpu")


def test_a_part_of_the_layout_or_an_adapter_given_as_the_model_says_what_to_pass(tmp_path, release_dir):
    with pytest.raises(CheckpointError, match=rf"it is a part of the release layout: pass the folder that holds it, "
                                              rf"{release_dir.resolve()}$"):
        load_model(release_dir / "medsight_full_instruct", device="cpu")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match=r"it is a LoRA adapter: pass it with --adapter"):
        load_model(tmp_path, device="cpu")


def test_a_vision_file_for_another_image_size_is_not_loaded_silently(golden, tmp_path, release_dir, caplog):
    """A ViT of the same width for another resolution (e.g. a 224-pixel ViT-L/14 for the 336-pixel UniMed-CLIP)
    fits every shape check and answers from other features: the load says so."""
    clip = safe_torch_load(release_dir / "unimed_clip_vit_l14.pt")["state_dict"]
    patch = clip["module.visual.conv1.weight"].shape[-1]
    tokens, width = clip["module.visual.positional_embedding"].shape
    side = round((tokens - 1) ** 0.5) + 2
    other = {**clip, "module.visual.positional_embedding": torch.zeros(side * side + 1, width)}
    torch.save({"state_dict": other}, tmp_path / "vit_other_size.pt")
    with caplog.at_level("WARNING", logger="medsight.model.loading"):
        model = load_tiny_release(golden, release_dir, vision=tmp_path / "vit_other_size.pt")
    assert model.config.vision.image_size == side * patch
    assert f"vit_other_size.pt is a ViT for {side * patch}-pixel images, but base config 'golden'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="medsight.model.loading"):
        load_tiny_release(golden, release_dir)
    assert "pixel images" not in caplog.text


def test_a_release_cloned_without_git_lfs_says_so_before_asking_for_the_vision_file(golden, tmp_path):
    root = write_release(golden, tmp_path / "clone")
    (root / "unimed_clip_vit_l14.pt").unlink()  # the release ships no vision file
    for weights in [*root.rglob("*.pt"), *root.rglob("*.safetensors")]:
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1000\n")
    with pytest.raises(CheckpointError, match=r"0079280\.pt is a Git LFS pointer"):
        load_model(root, device="cpu", base_config=golden_base_config(golden))


def test_two_vision_files_beside_a_release_are_not_guessed(golden, tmp_path, golden_model):
    """Of two UniMed-CLIP-like files beside a release the first by name was loaded without a word (here one of another
    ViT width, named so it sorts first); now the loader asks which, and the one passed as vision_file loads."""
    root = write_release(golden, tmp_path / "r", sharded=False)
    ours = root / "unimed_clip_vit_l14.pt"
    clip = safe_torch_load(ours)["state_dict"]
    width = clip["module.visual.conv1.weight"].shape[0]
    other = root / "biomed_clip_vit_b.pt"
    torch.save({"state_dict": {k: torch.zeros([width + 4 if n == width else n for n in v.shape])
                               for k, v in clip.items()}}, other)
    with pytest.raises(CheckpointError) as err:
        load_model(root, device="cpu", base_config=golden_base_config(golden))
    assert str(err.value) == (f"{root} holds 2 vision files ({other.name}, {ours.name}): pass the one to use with "
                              "--vision-file (vision_file= from Python)")
    model = load_model(root, device="cpu", base_config=golden_base_config(golden), vision_file=ours)
    assert_golden_parts(model, golden_model, ("image_encoder",))


def test_converted_safetensors_in_a_release_folder_are_found_and_preferred(golden, tmp_path, golden_model):
    """A trusted perceiver / UniMed-CLIP / codebook file the allow-list refuses is converted beside itself
    (`python -m medsight.model.unpickling X.pt X.safetensors`); the release-folder search looked for .pt only, so the
    converted copies were never found and the refused .pt was read again."""
    import datetime

    from medsight.model.unpickling import convert_trusted

    root = write_release(golden, tmp_path / "r", sharded=False)
    pickles = [root / "region_perceiver" / "0079280.pt", root / "unimed_clip_vit_l14.pt",
               root / "codebook" / "0035673.pt"]
    for pt in pickles:
        convert_trusted(pt, pt.with_suffix(".safetensors"))
        # The .pt beside it now names a global outside the allow-list (harmless here): only its copy can load.
        torch.save({**torch.load(pt, weights_only=False), "saved": datetime.date(2024, 1, 1)}, pt)
        with pytest.raises(CheckpointError, match="refused to unpickle"):
            safe_torch_load(pt)
    model = load_model(root, device="cpu", base_config=golden_base_config(golden))
    assert_golden_parts(model, golden_model, ("image_encoder", "region_perceiver", "codebook"))
    # Only the converted copies, .pt gone: found all the same; an older step's .pt does not win over the latest.
    for pt in pickles:
        pt.unlink()
    older = torch.load(golden / "perceiver_stage1_ckpt.pt", weights_only=True)
    older["model"] = {k: v + 1 for k, v in older["model"].items()}
    torch.save(older, root / "region_perceiver" / "0040000.pt")
    only = load_model(root, device="cpu", base_config=golden_base_config(golden))
    assert same_weights(only.region_perceiver, model.region_perceiver) and only.codebook is not None


@pytest.mark.parametrize("broken", ["dangling link", "folder"])
def test_a_release_perceiver_that_is_not_a_file_is_named(golden, tmp_path, broken):
    """The folder search lists a dangling link (its target deleted) or a folder by the checkpoint's name too: the
    loader opened it to look for a Git LFS pointer and raised a bare FileNotFoundError / IsADirectoryError."""
    root = write_release(golden, tmp_path / "r")
    perceiver = root / "region_perceiver" / "0079280.pt"
    perceiver.unlink()
    if broken == "folder":
        perceiver.mkdir()
        expected = rf"{re.escape(str(perceiver))} is a folder; expected the checkpoint file"
    else:
        perceiver.symlink_to(tmp_path / "deleted.pt")
        expected = rf"checkpoint file not found: {re.escape(str(perceiver))}"
    with pytest.raises(CheckpointError, match=expected):
        load_model(root, device="cpu", base_config=golden_base_config(golden))


@pytest.mark.parametrize("shards", [1, 2])
def test_a_folder_saved_as_pytorch_pickles_loads_the_same_weights(golden, tmp_path, golden_model, shards):
    """`save_pretrained(safe_serialization=False)` writes pytorch_model.bin (or shards and their index), which
    transformers reads: the loader refused the folder ("no .safetensors weights found"). The pickles are read through
    the allow-list like every other checkpoint: one naming anything else is still refused."""
    root = write_release(golden, tmp_path / "r")
    lvlm = root / "medsight_full_instruct"
    for weights in lvlm.glob("model*"):
        weights.unlink()
    state = torch.load(golden / "lvlm_tiny_state_dict.pt", weights_only=True)
    names = list(state)
    parts = {f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin": names[i::shards] for i in range(shards)}
    if shards == 1:
        parts = {"pytorch_model.bin": names}
    for name, keys in parts.items():  # the pre-1.6 format for the shards, as older transformers wrote them
        torch.save({k: state[k] for k in keys}, lvlm / name, _use_new_zipfile_serialization=shards == 1)
    if shards > 1:
        index = {"metadata": {}, "weight_map": {k: name for name, keys in parts.items() for k in keys}}
        (lvlm / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model = load_model(root, device="cpu", base_config=golden_base_config(golden))
    assert_golden_parts(model, golden_model, ("image_encoder", "region_perceiver", "language_model"))
    first = lvlm / next(iter(parts))
    torch.save({"lm_head.weight": subprocess.Popen}, first)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(first))}: refused to unpickle"):
        load_model(root, device="cpu", base_config=golden_base_config(golden))


def test_a_release_with_tied_embeddings_loads_as_transformers_ties_it(golden, tmp_path):
    """A config.json with tie_word_embeddings: true (Qwen3's smaller models) and no lm_head.weight, as transformers'
    save_pretrained writes it, was refused ("does not fit the model: missing key(s): lm_head.weight"); transformers
    loads it with the output layer tied to the embeddings. Now the embeddings stand for it, and the logits are
    transformers' own."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = write_release(golden, tmp_path / "r", sharded=False)
    lvlm = root / "medsight_full_instruct"
    state = load_file(str(lvlm / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(lvlm / "model.safetensors"))
    config = json.loads((lvlm / "config.json").read_text())
    (lvlm / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    model = load_model(root, device="cpu", base_config=golden_base_config(golden))
    lm = model.language_model
    assert torch.equal(lm.lm_head.weight, state["model.embed_tokens.weight"])
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()  # two parameters, two tensors

    tied = Qwen3ForCausalLM(Qwen3Config(**{**config, "model_type": "qwen3", "tie_word_embeddings": True}))
    projectors = ("model.mm_projector.", "model.token_projection.")
    tied.load_state_dict({k: v for k, v in state.items() if not k.startswith(projectors)}, strict=False)
    tied.tie_weights()
    ids = torch.arange(config["vocab_size"]).reshape(-1, 5)[:4]
    with torch.no_grad():
        ours, theirs = lm(input_ids=ids).logits, tied.eval()(input_ids=ids).logits
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() == 0


def test_another_safetensors_file_beside_pickled_weights_is_not_taken_for_them(golden, tmp_path, golden_model):
    """A folder of pytorch_model.bin with another .safetensors file beside it (a projector's, an adapter's) loaded
    that file as the model's weights ('does not fit the model: missing key(s): lm_head.weight, ...'), where
    transformers and the download (`model*.safetensors`) take pytorch_model.bin."""
    root = write_release(golden, tmp_path / "r", sharded=False)
    lvlm = root / "medsight_full_instruct"
    weights = lvlm / "model.safetensors"
    torch.save(load_file(str(weights)), lvlm / "pytorch_model.bin")
    weights.unlink()
    save_file({"weight": torch.zeros(2, 2)}, str(lvlm / "non_lora_trainables.safetensors"))
    model = load_model(root, device="cpu", base_config=golden_base_config(golden))
    assert_golden_parts(model, golden_model, ("language_model",))


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_checkpoints_saved_from_a_compiled_model_load_the_same_weights(golden, tmp_path, golden_model, prefix):
    """A stage-1, stage-2 or UniMed-CLIP file saved from a torch.compile'd model (names under `_orig_mod.`, with or
    without DDP's `module.`) was refused: 'unexpected key(s) in a perceiver checkpoint: _orig_mod.region_perceiver...'
    and 'no vision-encoder keys (expected visual.*)'. The prefix is removed as `module.` is."""
    root = write_release(golden, tmp_path / "r", sharded=False)
    files = (root / "region_perceiver" / "0079280.pt", root / "unimed_clip_vit_l14.pt",
             root / "codebook" / "0035673.pt")
    for path in files:
        saved = torch.load(path, weights_only=False)
        key = "state_dict" if "state_dict" in saved else "model"
        saved[key] = {prefix + name.removeprefix("module."): v for name, v in saved[key].items()}
        torch.save(saved, path)
    model = load_tiny_release(golden, root, codebook=files[2])
    assert_golden_parts(model, golden_model, ("image_encoder", "region_perceiver", "codebook"))
