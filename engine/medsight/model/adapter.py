"""LoRA adapters through PEFT, in the official release's layout.

The official LoRA recipe (`finetune_lora_slake.sh`) writes a PEFT folder:

    adapter_config.json            PEFT LoraConfig (r 16, alpha 32, dropout 0.05, q/k/v/o/gate/up/down)
    adapter_model.safetensors      the LoRA A/B matrices (or adapter_model.bin from older PEFT)
    non_lora_trainables.bin        the other trained tensors (e.g. mm_projector), keys prefixed `base_model.model.`
    config.json                    the language model's config
    medsight_base.json             (ours, not official) the base model the adapter was trained on: its name and
                                   `base_fingerprint`, checked when the adapter is applied (`check_base`)

LoRA is injected into the language model in place (`model.language_model` stays the same object, its targeted
Linear layers become PEFT LoRA layers), so every caller of the MedSIGHT model keeps working unmerged; `merge`
folds the adapter into the base weights and removes the LoRA layers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medsight.atomic_files import replace_file
from medsight.model.checkpoints import CheckpointError, read_safetensors_file, safe_torch_load

ADAPTER_CONFIG = "adapter_config.json"
NON_LORA_FILE = "non_lora_trainables.bin"
NON_LORA_PREFIX = "base_model.model."  # the PEFT wrapper's prefix of the language model's own names
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_FILE = "medsight_base.json"
#: Values `base_fingerprint` reads per tensor, evenly spaced over it.
FINGERPRINT_SAMPLES = 1024


@dataclass
class LoraSettings:
    """The official recipe's defaults; `lm_head` and the projectors are not LoRA targets."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS


def add_lora(model, settings: LoraSettings):
    """Inject fresh LoRA layers into `model.language_model` and freeze everything else in it.

    Returns the PeftModel (needed to save the adapter); `model.language_model` is still the same module.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model.language_model, config)


def is_lora_name(name: str) -> bool:
    return "lora_" in name


def base_fingerprint(model: nn.Module) -> str:
    """Identity of a model's weights, for the adapters trained on it: sha256 of every state-dict tensor's name, shape
    and `FINGERPRINT_SAMPLES` evenly spaced values rounded to bfloat16. Cheap (about a thousand values per tensor,
    not a hash of 16 GB) once the weights are in memory; memory-mapped weights on a cold disk cache are read about
    whole for it (readahead), a read the move to the device then does not repeat. The same for the model read
    from any layout in float32 or bfloat16 (the values round alike), and another for another model or a training
    of it that changes whole tensors, as every stage does.
    Take it before the model is cast to a narrower dtype (float16 rounds some values otherwise)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), FINGERPRINT_SAMPLES)
        # Integer positions: the same on every device (a float linspace rounds differently on CUDA and the CPU).
        index = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)
        values = flat[index.to(flat.device)].cpu()
        values = values.to(torch.bfloat16).view(torch.int16) if values.is_floating_point() else values.long()
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def check_base(folder: Path, fingerprint: str, model_name: str) -> None:
    """Refuse to apply the adapter in `folder` to a base other than the one it was trained on, as recorded in its
    `BASE_FILE` (adapters without one, such as the official ones, are not checked): PEFT applies an adapter to any
    model of the same layer shapes, so another base (another stage's output, another fine-tune, another release)
    gave a silently different model. `fingerprint`: `base_fingerprint` of the model `model_name` names."""
    path = folder / BASE_FILE
    if not path.is_file():
        return
    from medsight.user_files import read_user_json

    recorded = read_user_json(path, "adapter base record", CheckpointError)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("weights_fingerprint"), str):
        raise CheckpointError(f"{path}: expected an object with the base model's weights_fingerprint")
    if recorded["weights_fingerprint"] == fingerprint:
        return
    raise CheckpointError(f"the adapter {folder} was trained on a base model with weights fingerprint "
                          f"{recorded['weights_fingerprint'][:12]} (its run's init_from: "
                          f"{recorded.get('base_model', '?')!r}), but --model {model_name} has other weights "
                          f"(fingerprint {fingerprint[:12]}): the adapter would change a model it was not trained "
                          "with. Pass the model its LoRA run started from")


def save_adapter(peft_model, folder: str | Path, non_lora: list[str],
                 state: dict[str, torch.Tensor] | None = None, base: dict[str, str] | None = None) -> Path:
    """Write the official layout: PEFT files, `non_lora_trainables.bin` with the named tensors, config.json.

    Args:
        peft_model: what `add_lora` returned.
        non_lora: names (in the language model) of the other trained parameters.
        state: the language model's state dict (with LoRA layers) gathered by a sharded trainer; default: its own.
        base: the base model's record for `BASE_FILE` (`base_model`: its name, `weights_fingerprint`:
            `base_fingerprint` before training); none: no record, and no check when the adapter is applied.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm = peft_model.get_base_model()
    state = lm.state_dict() if state is None else state
    missing = [n for n in non_lora if n not in state]
    if missing:
        raise ValueError(f"non-LoRA trainables not in the language model: {', '.join(missing)}")
    if base is not None:
        # First, so that a save killed mid-write (a step checkpoint's, final/'s) leaves no adapter files without
        # it, which `check_base` would apply to any base; atomic: no torn record refusing the adapter as damaged.
        replace_file(folder / BASE_FILE, lambda target: target.write_text(json.dumps(base, indent=2)))
    lora = {NON_LORA_PREFIX + k: v for k, v in state.items() if is_lora_name(k)}
    peft_model.save_pretrained(str(folder), state_dict=lora, safe_serialization=True)
    torch.save({NON_LORA_PREFIX + n: state[n].detach().cpu().contiguous() for n in non_lora}, folder / NON_LORA_FILE)
    lm.config.to_json_file(str(folder / "config.json"))
    return folder


def restore_adapter(peft_model, folder: Path, non_lora: list[str], fingerprint: str, model_name: str) -> None:
    """Put the trained tensors a LoRA run's step checkpoint holds (`save_adapter`'s files) back into the model it
    trains, in place (LoRA layers already in): resume of a checkpoint that holds only what the run trains, on the
    base the run started from (`check_base`). Every LoRA tensor and every non-LoRA trainable must be in the files
    with its shape: a resume that kept a fresh tensor would silently continue another run."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    check_base(folder, fingerprint, model_name)
    saved = read_safetensors_file(folder / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(peft_model)
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & saved.keys() if saved[k].shape != expected[k].shape)
    trained = read_non_lora(folder)
    absent = sorted(set(non_lora) - trained.keys())
    if missing or unexpected or wrong or absent or trained.keys() - set(non_lora):
        raise CheckpointError(f"{folder} does not fit the run: LoRA tensors missing {missing[:3]}, unknown "
                              f"{unexpected[:3]}, mis-shaped {wrong[:3]}; non-LoRA trainables missing {absent[:3]}, "
                              f"unknown {sorted(trained.keys() - set(non_lora))[:3]}")
    set_peft_model_state_dict(peft_model, saved)
    params = dict(peft_model.get_base_model().named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            if value.shape != params[name].shape:
                raise CheckpointError(f"{folder / NON_LORA_FILE}: {name} has shape {tuple(value.shape)}, the model's "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(value)


def read_non_lora(folder: Path) -> dict[str, torch.Tensor]:
    """`non_lora_trainables.bin` with the official loader's prefix stripping (`base_model.model.`)."""
    path = folder / NON_LORA_FILE
    if not path.is_file():
        return {}
    data = safe_torch_load(path)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return {k.removeprefix(NON_LORA_PREFIX): v for k, v in data.items()}


def saved_adapter_names(folder: Path) -> set[str]:
    """The tensor names in the adapter's weight file (a damaged file is a CheckpointError naming it)."""
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        return set(read_safetensors_file(path))
    data = safe_torch_load(folder / "adapter_model.bin")
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder / 'adapter_model.bin'}: expected a dict of tensors")
    return set(data)


def adapter_base_seed(model: str, adapter: Path, seed: int | None) -> int:
    """The seed that rebuilds the random weights of a preset `model` as the LoRA run that trained `adapter` built
    them: an adapter applied to weights drawn from another seed gives a silently different model (logits off by
    more than their own size). Taken from the run's config beside the adapter (`<out>/final/` and
    `<out>/train_config.json`; a step checkpoint's, `<out>/checkpoints/step-N/`, two levels up) unless `seed` names
    it; a seed that contradicts the run's, or none at all, is refused.
    Every command that applies an adapter to a preset (ask, serve, eval, train merge) loads through this rule."""
    from medsight.train.loop import CHECKPOINT_DIR, CONFIG_FILE, TrainConfig
    from medsight.user_files import read_user_json

    in_checkpoints = adapter.absolute().parent
    run_dir = in_checkpoints.parent if in_checkpoints.name == CHECKPOINT_DIR else adapter.parent
    path = run_dir / CONFIG_FILE
    run = read_user_json(path, "LoRA run config") if path.is_file() else {}
    run_seed = run.get("seed", TrainConfig.seed) if isinstance(run, dict) and run.get("init_from") == model else None
    if seed is None and run_seed is None:
        raise ValueError(f"--model {model} is a preset with random weights: the weights {adapter} was trained on are "
                         f"rebuilt from its LoRA run's seed, but no {CONFIG_FILE} of a run from {model} is beside it "
                         f"({path}); keep the adapter in its run's folder, or pass --seed with the run's seed "
                         "(medsight train merge)")
    if seed is not None and run_seed is not None and seed != run_seed:
        raise ValueError(f"--seed {seed} differs from the seed of the run that trained {adapter} ({run_seed} in "
                         f"{path}): it would rebuild other weights than the adapter was trained on")
    return run_seed if seed is None else seed


def load_adapter(model, folder: str | Path, merge: bool = True, fingerprint: str | None = None,
                 model_name: str = "") -> nn.Module:
    """Apply an adapter in the official layout to `model` (a MedSIGHTModel) in place; returns its language model.

    The LoRA layers go in through PEFT (`PeftModel.from_pretrained`), the non-LoRA tensors replace the base ones of
    the same names (every key must exist with the same shape). With `merge`, LoRA is folded into the base weights
    (`merge_and_unload`), as the official chatbot does. An adapter that records its base (`BASE_FILE`) must meet
    that base (`check_base`): `fingerprint` is `model`'s `base_fingerprint` taken before a cast (default: taken
    now), `model_name` what the user called it.
    """
    from peft import PeftModel

    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG} (is this a LoRA adapter folder?)")
    try:
        peft_type = json.loads(config_path.read_text()).get("peft_type")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if peft_type != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {peft_type!r}; only LORA adapters are supported")
    if not any((folder / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise CheckpointError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    check_base(folder, fingerprint or base_fingerprint(model), model_name or "model")
    saved = saved_adapter_names(folder)
    non_lora = read_non_lora(folder)
    lm = model.language_model
    expected = lm.state_dict()
    unknown = sorted(k for k in non_lora if k not in expected)
    wrong = sorted(k for k in non_lora if k in expected and non_lora[k].shape != expected[k].shape)
    if unknown or wrong:
        raise CheckpointError(f"{folder / NON_LORA_FILE} does not fit the model: unknown {unknown[:8]}, "
                              f"mis-shaped {wrong[:8]}")
    try:
        peft_model = PeftModel.from_pretrained(lm, str(folder), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as err:
        detail = " ".join(str(err).split())  # torch's size-mismatch report spans lines: one line here
        raise CheckpointError(f"{folder}: the adapter does not fit the model ({detail})") from None
    # PEFT loads adapter weights leniently: a layer the file lacks keeps its fresh LoRA (B = 0, a no-op) with only
    # a warning, so an adapter of another model would silently change nothing. Every layer must be in the file.
    from peft.utils import get_peft_model_state_dict

    # The LoRA tensors must all be there; the embeddings may be (PEFT saves them where the vocabulary grew), but are
    # not required: PEFT's default "auto" would require them wherever the base named in the adapter's config is
    # reachable and has another vocabulary, as the official adapters' Qwen/Qwen3-8B has.
    lora = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    allowed = set(get_peft_model_state_dict(peft_model, save_embedding_layers=True))
    missing, unexpected = sorted(lora - saved), sorted(saved - allowed)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: the adapter does not fit the model (is it for another base model?): "
                              f"{len(missing)} of its {len(lora)} LoRA tensors missing {missing[:3]}, "
                              f"{len(unexpected)} not in the model {unexpected[:3]}")
    device, dtype = expected[next(iter(expected))].device, model.dtype
    peft_model.to(device)
    with torch.no_grad():
        params = dict(lm.named_parameters())
        for key, value in non_lora.items():
            # After injection a targeted layer's weight lives at `...base_layer.weight`; others keep their names.
            owner, leaf = key.rsplit(".", 1)
            target = params[key] if key in params else params[f"{owner}.base_layer.{leaf}"]
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    if merge:
        peft_model.merge_and_unload()
    lm.to(dtype=dtype)
    return lm.eval()
