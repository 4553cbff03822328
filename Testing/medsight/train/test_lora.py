"""LoRA (PEFT) on stage 5 of the tiny model, the official adapter layout, and `--adapter` in the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medsight.cli import main as cli_main
from medsight.config import tiny_config
from medsight.model.adapter import ADAPTER_CONFIG, NON_LORA_FILE, NON_LORA_PREFIX, load_adapter
from medsight.model.checkpoints import CheckpointError
from medsight.model.loading import build_model, load_model, load_pretrained, save_pretrained
from medsight.train.cli import main as train_main
from medsight.train.loop import TrainConfig
from medsight.train.stages import LoraConfig, run_stage5
from medsight_testing.train_data import probe, write_synthetic

CONFIG = LoraConfig(lr=1e-2, projector_lr=1e-3, max_steps=4, grad_accum=1, warmup_ratio=0.0)
LISTED = ("model.mm_projector.", "model.token_projection.")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    data = write_synthetic(root / "data")
    base = save_pretrained(build_model(tiny_config(), seed=0), root / "base")
    model = load_pretrained(base)
    result = run_stage5(model, data["lvlm"], replace(CONFIG, init_from=str(base)), root / "out")
    model.eval()
    with torch.no_grad():
        logits = probe(model, data["lvlm"])
    return {"root": root, "data": data, "base": base, "model": model, "final": result.final_dir,
            "logits": logits}


def test_only_adapter_and_listed_parameters_change(run):
    base = load_pretrained(run["base"])
    before = base.language_model.state_dict()
    after = run["model"].language_model.state_dict()
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: every adapter trained
    changed = set()
    for key, value in after.items():
        if "lora_" in key:
            continue
        name = key.replace(".base_layer", "")
        if not torch.equal(value, before[name]):
            changed.add(name)
    listed = {k for k in before if k.startswith(LISTED)}
    assert changed == listed
    for part in ("image_encoder", "region_perceiver"):
        for (k, a), b in zip(getattr(base, part).state_dict().items(),
                             getattr(run["model"], part).state_dict().values(), strict=True):
            assert torch.equal(a, b), k


def test_saved_in_the_official_layout(run):
    folder = run["final"]
    assert {ADAPTER_CONFIG, "adapter_model.safetensors", NON_LORA_FILE, "config.json"} <= {
        p.name for p in folder.iterdir()}
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    non_lora = torch.load(folder / NON_LORA_FILE, weights_only=True)
    assert non_lora and all(k.startswith(NON_LORA_PREFIX + "model.") for k in non_lora)


@pytest.mark.parametrize("merge", [False, True])
def test_reloaded_adapter_gives_identical_logits(run, merge):
    model = load_pretrained(run["base"])
    load_adapter(model, run["final"], merge=merge)
    assert any("lora_" in k for k in model.state_dict()) != merge
    with torch.no_grad():
        got = probe(model, run["data"]["lvlm"])
    for key, want in run["logits"].items():
        diff = (got[key] - want).abs().max().item()
        print(f"merge={merge} {key}: max abs diff {diff:.2e}")
        # Unmerged runs the same arithmetic; merging folds B @ A into W, which rounds differently in float32.
        assert diff <= (2e-6 if merge else 0.0) * max(1.0, want.abs().max().item()), (key, diff)


def test_merge_command_writes_the_adapter_model_and_never_over_a_model(run, tmp_path, capsys):
    """`medsight train merge` gives the trained adapter model's outputs; an --out that holds files (here the base
    model itself) is refused before anything is loaded, and keeps its bytes."""
    merged = tmp_path / "merged"
    assert train_main(["merge", "--model", str(run["base"]), "--adapter", str(run["final"]),
                       "--out", str(merged)]) == 0
    with torch.no_grad():
        got = probe(load_pretrained(merged), run["data"]["lvlm"])
    for key, want in run["logits"].items():
        diff = (got[key] - want).abs().max().item()
        assert diff <= 2e-6 * max(1.0, want.abs().max().item()), (key, diff)  # merging rounds B @ A into W
    before = {p.name: p.read_bytes() for p in run["base"].iterdir()}
    for out in (run["base"], merged):
        with pytest.raises(ValueError, match=rf"--out {out} is not empty \(.*model\.safetensors.*\); merge into a new "
                                             r"or empty folder"):
            train_main(["merge", "--model", str(run["base"]), "--adapter", str(run["final"]), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in run["base"].iterdir()} == before


def test_a_merged_model_is_refused_as_a_stage4_start_that_resets_the_code_rows(run, tmp_path):
    """A merged model had no trained-by record: a stage-4 run with init_code_embeddings started from it reset the
    code rows of its base (a stage-4/5 output, as a rule). The merge now records a stage-5 output."""
    from medsight.train.cli import check_code_rows
    from medsight.train.loop import TRAINED_BY_FILE

    merged = tmp_path / "merged"
    assert train_main(["merge", "--model", str(run["base"]), "--adapter", str(run["final"]),
                       "--out", str(merged)]) == 0
    record = json.loads((merged / TRAINED_BY_FILE).read_text())
    assert (record["stage"], record["base_model"], record["adapter"]) == ("stage5-lora", str(run["base"]),
                                                                          str(run["final"]))
    with pytest.raises(ValueError, match=rf"init_from '{merged}' is the output of a stage5-lora run"):
        check_code_rows(merged, str(merged))


def test_a_merged_model_records_whether_its_code_rows_are_trained(run, tmp_path):
    """A merge output counted as trained code rows whatever its base: a model merged onto a stage-3 output (rows as
    built; the adapter trains mm_projector and token_projection) was refused as a stage-4 start. The merge now records
    whether the rows are trained: the base's record says (untrained for stages 1-3, trained for 4-5 and for a base
    without a record, such as a release), unless the adapter trains the input embedding itself."""
    import shutil

    from medsight.train.cli import check_code_rows
    from medsight.train.loop import TRAINED_BY_FILE, write_trained_by

    def merged(base_stage: str) -> Path:
        base = Path(shutil.copytree(run["base"], tmp_path / f"base-{base_stage}"))  # the adapter's base weights
        write_trained_by(base, base_stage, 1)
        out = tmp_path / f"merged-{base_stage}"
        assert train_main(["merge", "--model", str(base), "--adapter", str(run["final"]), "--out", str(out)]) == 0
        return out

    from_stage3, from_stage4 = merged("stage3"), merged("stage4")
    assert json.loads((from_stage3 / TRAINED_BY_FILE).read_text())["code_rows_trained"] is False
    check_code_rows(from_stage3, str(from_stage3))  # not refused: its rows are the stage-3 base's, untrained
    assert json.loads((from_stage4 / TRAINED_BY_FILE).read_text())["code_rows_trained"] is True
    with pytest.raises(ValueError, match=rf"init_from '{from_stage4}' is the output of a stage5-lora run"):
        check_code_rows(from_stage4, str(from_stage4))


def lora_run_from_preset(run, tmp_path, seed: int):
    """A short LoRA run from the tiny preset with `seed`: its --out folder, and the model it trained (the preset's
    weights drawn from that seed, with the adapter applied unmerged)."""
    from medsight.train.cli import initial_model

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"init_from": "tiny", "seed": seed, "max_steps": 2, "grad_accum": 1, "lr": 1e-2}))
    out = tmp_path / "out"
    assert train_main(["lora", "--config", str(config), "--data", str(run["data"]["root"]), "--out", str(out)]) == 0
    trained = initial_model(LoraConfig.from_json(config))
    load_adapter(trained, out / "final", merge=False)
    return out, trained


def test_merge_onto_a_preset_rebuilds_the_weights_the_run_trained_on(run, tmp_path):
    """A LoRA run from a preset trains on random weights drawn from its seed; merge rebuilt the preset from seed 0
    whatever the run's seed was, and wrote a model whose logits differed from the adapter's by more than their own
    size. It takes the run's seed (train_config.json beside final/) and refuses to guess where there is none."""
    import shutil


    seed = TrainConfig().seed + 3
    out, trained = lora_run_from_preset(run, tmp_path, seed)
    merged = tmp_path / "merged"
    assert train_main(["merge", "--model", "tiny", "--adapter", str(out / "final"), "--out", str(merged)]) == 0
    with torch.no_grad():
        want, got = probe(trained.eval(), run["data"]["lvlm"]), probe(load_pretrained(merged), run["data"]["lvlm"])
    for key in want:
        diff = (got[key] - want[key]).abs().max().item()
        assert diff <= 2e-6 * max(1.0, want[key].abs().max().item()), (key, diff)  # merging rounds B @ A into W
    lone = shutil.copytree(out / "final", tmp_path / "lone")  # no run config beside it: the seed is unknown
    with pytest.raises(ValueError, match=r"--model tiny is a preset with random weights: the weights .* was trained "
                                         r"on are rebuilt from its LoRA run's seed, but no train_config\.json"):
        train_main(["merge", "--model", "tiny", "--adapter", str(lone), "--out", str(tmp_path / "m2")])
    with pytest.raises(ValueError, match=rf"--seed {seed + 1} differs from the seed of the run .* \({seed} in"):
        train_main(["merge", "--model", "tiny", "--adapter", str(out / "final"), "--out", str(tmp_path / "m3"),
                    "--seed", str(seed + 1)])


def test_ask_serve_and_eval_apply_an_adapter_to_a_preset_rebuilt_from_the_runs_seed(run, tmp_path, capsys):
    """`medsight ask/serve/eval --model tiny --adapter DIR` load through `Engine.load`, which rebuilt the preset from
    seed 0 whatever the LoRA run's seed was (merge already took the run's): the adapter then met other weights. They
    take the run's seed by the same rule as merge; a contradicting seed, or none to be found, is refused."""
    import shutil

    from medsight.engine import Engine

    seed = TrainConfig().seed + 5
    out, trained = lora_run_from_preset(run, tmp_path, seed)
    loaded = Engine.load("tiny", device="cpu", dtype=torch.float32, adapter=out / "final").model
    with torch.no_grad():
        want, got = probe(trained.eval(), run["data"]["lvlm"]), probe(loaded, run["data"]["lvlm"])
    for key in want:
        diff = (got[key] - want[key]).abs().max().item()
        assert diff <= 2e-6 * max(1.0, want[key].abs().max().item()), (key, diff)  # merging rounds B @ A into W
    with pytest.raises(ValueError, match=rf"--seed {seed + 1} differs from the seed of the run .* \({seed} in"):
        load_model("tiny", device="cpu", adapter=out / "final", seed=seed + 1)
    lone = shutil.copytree(out / "final", tmp_path / "lone")  # no run config beside it: the seed is unknown
    image = next((run["data"]["root"] / "ct" / "images").glob("*.png"))
    assert cli_main(["ask", str(image), "Where?", "--model", "tiny", "--adapter", str(lone), "--device", "cpu"]) == 2
    assert f"no train_config.json of a run from tiny is beside it ({tmp_path / 'train_config.json'})" in \
        capsys.readouterr().err


def test_an_adapter_is_refused_on_a_base_other_than_the_one_it_was_trained_on(run, tmp_path, capsys):
    """PEFT applies an adapter to any model of the same layer shapes: `--model OTHER --adapter DIR` (another stage's
    output, another fine-tune) loaded and answered with a model nobody trained. The run now records its base's
    weights fingerprint beside the adapter; ask, serve, eval and merge refuse another base, naming both, and the base
    with the adapter merged in. The base itself loads in any dtype, and from a copy of it in bfloat16."""
    other = save_pretrained(build_model(tiny_config(), seed=TrainConfig().seed + 1), tmp_path / "other")
    message = (rf"the adapter {run['final']} was trained on a base model with weights fingerprint [0-9a-f]{{12}} "
               rf"\(its run's init_from: '{run['base']}'\), but --model {other} has other weights \(fingerprint "
               r"[0-9a-f]{12}\)")
    with pytest.raises(CheckpointError, match=message):
        load_model(str(other), device="cpu", adapter=run["final"])
    image = next((run["data"]["root"] / "ct" / "images").glob("*.png"))
    assert cli_main(["ask", str(image), "Where?", "--model", str(other), "--adapter", str(run["final"]),
                     "--device", "cpu"]) == 2
    assert "has other weights" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=message):
        train_main(["merge", "--model", str(other), "--adapter", str(run["final"]), "--out", str(tmp_path / "m")])
    merged = tmp_path / "merged"  # the base with the adapter in it: the adapter again would count twice
    assert train_main(["merge", "--model", str(run["base"]), "--adapter", str(run["final"]), "--out", str(merged)]) == 0
    with pytest.raises(CheckpointError, match=rf"but --model {merged} has other weights"):
        load_model(str(merged), device="cpu", adapter=run["final"])
    as_bf16 = load_pretrained(run["base"]).to(torch.bfloat16)
    copy = save_pretrained(as_bf16, tmp_path / "base-bf16")
    for base, dtype in ((run["base"], torch.bfloat16), (copy, torch.float32)):
        model = load_model(str(base), device="cpu", dtype=dtype, adapter=run["final"])
        assert model.weights_source.endswith(f"LoRA adapter {run['final']}")


def test_a_save_killed_while_writing_the_base_record_leaves_no_torn_record(tmp_path, monkeypatch):
    """`medsight_base.json` was written in place after the adapter files: a save killed mid-write left a torn record,
    and the adapter was then refused as damaged. It now goes through the atomic writer: the record is whole or
    absent, and no temporary is left beside the adapter."""
    from medsight.model.adapter import BASE_FILE, LoraSettings, add_lora, base_fingerprint, save_adapter

    model = build_model(tiny_config())
    base = {"base_model": "tiny", "weights_fingerprint": base_fingerprint(model)}
    peft_model = add_lora(model, LoraSettings())
    plain_write = Path.write_text

    def killed_write(self: Path, data: str, *args, **kwargs) -> int:
        if BASE_FILE not in self.name:
            return plain_write(self, data, *args, **kwargs)
        plain_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", killed_write)
    folder = tmp_path / "adapter"
    with pytest.raises(OSError):
        save_adapter(peft_model, folder, [], base=base)
    assert not (folder / BASE_FILE).exists()
    assert [p.name for p in folder.iterdir() if BASE_FILE in p.name] == []



def test_a_save_killed_after_the_peft_files_leaves_an_adapter_that_another_base_refuses(tmp_path, monkeypatch):
    """`medsight_base.json` was written after the adapter's tensors: a save killed in between (a step checkpoint's,
    written every save_every steps) left adapter_config.json and the LoRA weights without the record, and
    `--adapter` then applied them to any base, as an official adapter. The record is now written first."""
    from medsight.model.adapter import BASE_FILE, LoraSettings, add_lora, base_fingerprint, save_adapter

    seed = TrainConfig().seed
    model = build_model(tiny_config(), seed=seed)
    base = {"base_model": "tiny", "weights_fingerprint": base_fingerprint(model)}
    peft_model = add_lora(model, LoraSettings())
    plain_save = torch.save

    def killed_save(data, path, *args, **kwargs):
        if Path(path).name == NON_LORA_FILE:
            raise OSError(28, "No space left on device")
        return plain_save(data, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_save)
    folder = tmp_path / "adapter"
    with pytest.raises(OSError):
        save_adapter(peft_model, folder, ["model.mm_projector.0.weight"], base=base)
    other = save_pretrained(build_model(tiny_config(), seed=seed + 1), tmp_path / "other")
    with pytest.raises(CheckpointError, match=rf"the adapter {folder} was trained on a base model .* has other"):
        load_model(str(other), device="cpu", adapter=folder)
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / BASE_FILE).is_file()

def test_init_from_demo_fine_tunes_the_embedded_trained_model(run):
    """`load_model("demo")` (ask, serve, eval, merge) is the embedded trained model; a run's `init_from: "demo"`
    built the demo preset with random weights (another vocabulary, even), so a LoRA adapter trained from it was
    applied to weights it never saw. A run from "demo" now starts from the embedded model."""
    from medsight.model.loading import EMBEDDED
    from medsight.train.cli import initial_model

    started = initial_model(LoraConfig(init_from="demo")).state_dict()
    embedded = load_pretrained(EMBEDDED["demo"]).state_dict()
    assert started.keys() == embedded.keys()
    assert max((started[k].float() - embedded[k].float()).abs().max().item() for k in embedded) == 0


def test_adapter_naming_a_base_of_another_vocabulary_loads(run, tmp_path):
    """The official adapters name their base (`Qwen/Qwen3-8B`, whose vocabulary lacks the region codes). Where PEFT
    can read that base's config, its default counts the embeddings as adapter tensors; the completeness check must
    not then refuse the adapter for lacking them."""
    import shutil

    folder = shutil.copytree(run["final"], tmp_path / "adapter")
    lm_config = load_pretrained(run["base"]).language_model.config.to_dict()
    other = tmp_path / "base-of-another-vocabulary"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**lm_config, "vocab_size": lm_config["vocab_size"] + 7}))
    adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(other)}))
    model = load_pretrained(run["base"])
    load_adapter(model, folder, merge=False)
    with torch.no_grad():
        got = probe(model, run["data"]["lvlm"])
    for key, want in run["logits"].items():
        assert torch.equal(got[key], want), key


def write_official_adapter(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """An adapter as the official recipe leaves it, written with PEFT itself plus a non_lora_trainables.bin."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lm = load_pretrained(base).language_model
    peft_model = get_peft_model(lm, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                   target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # non-zero so that the adapter changes the model
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(folder))
    projector = {f"{NON_LORA_PREFIX}model.mm_projector.{k}": torch.randn(v.shape, generator=generator)
                 for k, v in lm.model.mm_projector.state_dict().items()}
    torch.save(projector, folder / NON_LORA_FILE)
    lm.config.to_json_file(str(folder / "config.json"))
    return projector


def test_official_adapter_loads_through_cli_and_answers(run, tmp_path, capsys):
    folder = tmp_path / "adapter"
    projector = write_official_adapter(run["base"], folder)
    model = load_model(str(run["base"]), device="cpu", adapter=folder)
    base = load_pretrained(run["base"])
    for key, value in projector.items():
        name = key.removeprefix(NON_LORA_PREFIX + "model.mm_projector.")
        assert torch.equal(model.language_model.mm_projector.state_dict()[name], value)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.language_model.state_dict()[q], base.language_model.state_dict()[q])  # merged
    image = next((run["data"]["root"] / "ct" / "images").glob("*.png"))
    code = cli_main(["ask", str(image), "Where is the square?", "--model", str(run["base"]), "--adapter",
                     str(folder), "--device", "cpu", "--max-new-tokens", "6", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    answer = json.loads(out.out.strip().splitlines()[-1])
    assert isinstance(answer["answer"], str) and answer["slices"]


def test_bad_adapter_folder_is_a_clear_error(run, tmp_path, capsys):
    image = next((run["data"]["root"] / "ct" / "images").glob("*.png"))
    code = cli_main(["ask", str(image), "Where?", "--model", str(run["base"]), "--adapter", str(tmp_path),
                     "--device", "cpu"])
    assert code == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_lora_recipe_from_the_cli(run, tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"init_from": str(run["base"]), "max_steps": 1, "grad_accum": 1}))
    out = tmp_path / "out"
    assert train_main(["lora", "--config", str(config), "--data", str(run["data"]["root"]), "--out", str(out)]) == 0
    assert (out / "final" / ADAPTER_CONFIG).is_file()


def test_adapter_whose_layers_the_file_lacks_is_refused_not_a_silent_no_op(run, tmp_path):
    """PEFT only warns when the file misses LoRA tensors (an adapter saved from another model's module names, or a
    partial file) and leaves those layers at B = 0: the model would answer as if no adapter were given."""
    from safetensors.torch import load_file, save_file

    for name, rename in (("other", lambda k: k.replace(".layers.", ".h.")), ("partial", None)):
        folder = tmp_path / name
        write_official_adapter(run["base"], folder)
        weights = folder / "adapter_model.safetensors"
        state = load_file(str(weights))
        if rename is None:
            dropped = sorted(state)[0]
            state.pop(dropped)
        else:
            state = {rename(k): v for k, v in state.items()}
        save_file(state, str(weights))
        with pytest.raises(CheckpointError, match=r"the adapter does not fit the model \(is it for another base"):
            load_model(str(run["base"]), device="cpu", adapter=folder)
    weights.write_bytes(weights.read_bytes()[:100])  # a partial download
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_model(str(run["base"]), device="cpu", adapter=folder)


def test_a_lora_target_the_model_lacks_is_named_before_the_model_is_loaded(run, tmp_path):
    """PEFT dropped a misspelt entry beside good ones without a word ("qproj" beside "q_proj": that run adapted only
    q_proj), and refused a list of only bad ones after the model was built. The CLI checks the entries against the
    start model's layers before it loads it (here its weights file is damaged: a load would fail on that first);
    run_stage5 checks the model it is given."""
    import shutil

    start = shutil.copytree(run["base"], tmp_path / "start")
    weights = start / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for targets, named in ((["q_proj", "qproj"], r"qproj \(did you mean q_proj\?\)"), (["bogus"], "bogus")):
        config = tmp_path / "cfg.json"
        config.write_text(json.dumps({"init_from": str(start), "max_steps": 1, "lora_targets": targets}))
        with pytest.raises(ValueError, match=rf"field 'lora_targets': {named} names no layer of the language model "
                                             r"that LoRA can adapt; its layers: down_proj, .*q_proj"):
            train_main(["lora", "--config", str(config), "--data", str(run["data"]["root"]),
                        "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    model = load_pretrained(run["base"])
    with pytest.raises(ValueError, match=r"field 'lora_targets': qproj \(did you mean q_proj\?\)"):
        run_stage5(model, run["data"]["lvlm"], LoraConfig(max_steps=1, lora_targets=("q_proj", "qproj")),
                   tmp_path / "out")
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_export_official_is_refused_for_lora_not_ignored(tmp_path, capsys):
    with pytest.raises(ValueError, match="export_official does not apply to a LoRA run"):
        LoraConfig(export_official=True)
    config = tmp_path / "lora.json"
    config.write_text(json.dumps({"init_from": "tiny", "export_official": True}))
    out = tmp_path / "out"
    args = ["train", "lora", "--config", str(config), "--data", str(tmp_path), "--out", str(out)]
    assert cli_main(args) == 2  # refused before a model is built or anything written
    err = capsys.readouterr().err
    assert str(config) in err and "export_official" in err and "final/ already is the official adapter" in err
    assert not out.exists()


def test_a_non_lora_trainable_the_model_lacks_is_named_before_the_model_is_loaded(run, tmp_path):
    """A misspelt `non_lora_trainables` entry was refused only inside run_stage5: after the start model was loaded
    (minutes for the 8B model) and the data read and checked. The CLI now checks the entries on the meta device first
    (here the start's weights file is damaged: a load would fail on that first)."""
    import shutil

    start = shutil.copytree(run["base"], tmp_path / "start")
    weights = start / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"init_from": str(start), "max_steps": 1,
                                  "non_lora_trainables": ["model.mm_projector", "model.token_projecton"]}))
    with pytest.raises(ValueError, match=r"non_lora_trainables not found in the language model: "
                                         r"model\.token_projecton$"):
        train_main(["lora", "--config", str(config), "--data", str(run["data"]["root"]), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def _folder_bytes(folder: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name not in skip)


def test_a_step_checkpoint_holds_only_what_the_run_trains_and_is_an_adapter(run, tmp_path, capsys):
    """A LoRA run's step checkpoints held the whole model, frozen base included (about 18 GB per step for the 8B
    model), and could be neither loaded as a model nor passed as --adapter. They now hold the adapter in final/'s
    layout (PEFT files, non_lora_trainables.bin, the base record) with the trainer state: ask, eval and merge take
    one as --adapter, on the base it was trained on only."""
    from safetensors.torch import load_file

    from medsight.train.loop import CHECKPOINT_DIR, STATE_FILE, TRAINED_BY_FILE

    step = run["root"] / "out" / CHECKPOINT_DIR / f"step-{CONFIG.max_steps:07d}"  # the last step: final/'s weights
    trained = [p for p in run["model"].parameters() if p.requires_grad]
    trained_bytes = sum(p.numel() * p.element_size() for p in trained)
    model_bytes = sum(t.numel() * t.element_size() for t in run["model"].state_dict().values())
    held = _folder_bytes(step, (STATE_FILE, TRAINED_BY_FILE))
    before = _folder_bytes(save_pretrained(run["model"], tmp_path / "whole"))  # what a step checkpoint held
    # The trained tensors and small headers and configs: a fraction of the model, as trained / model bytes is.
    assert trained_bytes <= held < 2 * trained_bytes < model_bytes, (trained_bytes, held, model_bytes)
    assert before / held > model_bytes / (2 * trained_bytes), (before, held)
    for name in ("adapter_model.safetensors",):
        want, got = load_file(run["final"] / name), load_file(step / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    want, got = (torch.load(f / NON_LORA_FILE, weights_only=True) for f in (run["final"], step))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    final = load_model(str(run["base"]), device="cpu", adapter=run["final"])
    from_step = load_model(str(run["base"]), device="cpu", adapter=step)
    with torch.no_grad():
        want_logits, got_logits = probe(final, run["data"]["lvlm"]), probe(from_step, run["data"]["lvlm"])
    assert all(torch.equal(want_logits[k], got_logits[k]) for k in want_logits)
    other = save_pretrained(build_model(tiny_config(), seed=TrainConfig().seed + 1), tmp_path / "other")
    with pytest.raises(CheckpointError, match=rf"the adapter {step} was trained on a base model .* has other weights"):
        load_model(str(other), device="cpu", adapter=step)
    image = next((run["data"]["root"] / "ct" / "images").glob("*.png"))
    code = cli_main(["ask", str(image), "Where?", "--model", str(run["base"]), "--adapter", str(step),
                     "--device", "cpu", "--max-new-tokens", "4", "--json"])
    assert code == 0, capsys.readouterr().err
    merged = tmp_path / "merged"
    assert train_main(["merge", "--model", str(run["base"]), "--adapter", str(step), "--out", str(merged)]) == 0
    with torch.no_grad():
        got_logits = probe(load_pretrained(merged), run["data"]["lvlm"])
    assert all(torch.equal(want_logits[k], got_logits[k]) for k in want_logits)


def test_a_step_checkpoint_of_a_run_from_a_preset_finds_the_runs_seed(run, tmp_path):
    """A preset's weights are rebuilt from the LoRA run's seed, read from the run's train_config.json: beside
    final/, and two levels above a step checkpoint (out/checkpoints/step-N/)."""
    from medsight.train.loop import CHECKPOINT_DIR

    seed = TrainConfig().seed + 3
    out, trained = lora_run_from_preset(run, tmp_path, seed)
    step = next((out / CHECKPOINT_DIR).glob("step-*"))
    loaded = load_model("tiny", device="cpu", dtype=torch.float32, adapter=step)
    with torch.no_grad():
        want, got = probe(trained.eval(), run["data"]["lvlm"]), probe(loaded, run["data"]["lvlm"])
    for key in want:
        diff = (got[key] - want[key]).abs().max().item()
        assert diff <= 2e-6 * max(1.0, want[key].abs().max().item()), (key, diff)  # merging rounds B @ A into W
