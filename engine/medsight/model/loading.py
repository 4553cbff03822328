"""`load_model`: a preset, our saved format, the official release layout, or a Hugging Face repo id.

Every file argument also takes a Hub address `REPO_ID:FILENAME[@REVISION]` (see `medsight.model.hub`)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from medsight.config import PRESETS, MedSIGHTConfig, PerceiverConfig, VisionConfig, get_preset
from medsight.model.checkpoints import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_into,
    read_codebook_state,
    read_perceiver_state,
    read_safetensors_folder,
    read_vision_state,
    refuse_lfs_pointer,
    safetensors_names,
    save_safetensors,
    split_lvlm_state,
)
from medsight.model.hub import (
    CODEBOOK_FILES,
    LVLM_FOLDER,
    NO_LAYOUT,
    PERCEIVER_FILES,
    PERCEIVER_FOLDER,
    UNIMED_CLIP,
    VISION_FILES,
    HubUnreachableError,
    cached_model,
    checkpoint_patterns,
    fetch_release,
    loaded_checkpoint,
    parse_repo,
    plan_release,
    resolve_file,
    vision_file_for_release,
)
from medsight.model.lvlm import llm_config_from_released
from medsight.model.medsight import MedSIGHTModel, holds_codebook
from medsight.model.tokenizer import load_tokenizer
from medsight.user_files import check_user_file

log = logging.getLogger(__name__)

# Trained checkpoints that ship inside the package, by name (they take precedence over same-named presets).
EMBEDDED = {"demo": Path(__file__).resolve().parents[1] / "assets" / "demo_model"}


def embedded_folder(name: str | Path) -> Path | None:
    """The folder of the trained model that ships under `name`, or None."""
    folder = EMBEDDED.get(str(name))
    return folder if folder is not None and (folder / CONFIG_FILE).is_file() else None


def is_random_preset(source: str | Path) -> bool:
    """Whether `load_model` (and a training run's `init_from`) builds `source` with random weights: a preset that
    is not also an embedded trained model."""
    return str(source) in PRESETS and embedded_folder(source) is None


def build_model(config: MedSIGHTConfig, tokenizer=None, seed: int = 0) -> MedSIGHTModel:
    """A model with freshly initialised weights (deterministic for a given seed, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MedSIGHTModel(config, tokenizer)


def save_pretrained(model: MedSIGHTModel, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Our format: `medsight_config.json`, `model.safetensors` and the tokenizer files.

    `state` replaces `model.state_dict()` (a sharded trainer passes the state it gathered on one rank)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json(folder / CONFIG_FILE)
    state = model.state_dict() if state is None else state
    save_safetensors(state, folder / WEIGHTS_FILE, {"format": "pt", "medsight": model.config.name})
    model.tokenizer.save_pretrained(str(folder))
    return folder


def load_pretrained(folder: str | Path) -> MedSIGHTModel:
    """Load a folder written by `save_pretrained`."""
    folder = Path(folder)
    try:
        config = MedSIGHTConfig.from_json(folder / CONFIG_FILE)
    except (ValueError, TypeError, AttributeError) as err:  # bad JSON, unknown fields, a list instead of an object
        raise CheckpointError(f"{folder / CONFIG_FILE}: not a valid MedSIGHT config ({err})") from None
    model = _empty_model(config, load_tokenizer(folder))
    state = read_safetensors_folder(folder)
    if holds_codebook(state):
        model.attach_codebook()
    load_into(model, state, str(folder / WEIGHTS_FILE), assign=True)
    return _finish(model)


def infer_vision_config(state: dict[str, torch.Tensor], base: VisionConfig) -> VisionConfig:
    """ViT sizes from its tensors; head width (not visible in shapes) comes from `base`."""
    try:
        width, _, patch, _ = state["conv1.weight"].shape
        grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
        embed_dim = state["proj"].shape[1]
    except KeyError as err:
        raise CheckpointError(f"vision checkpoint lacks {err.args[0]!r}") from None
    return replace(base, width=width, patch_size=patch, image_size=grid * patch, layers=layers,
                   mlp_ratio=mlp, embed_dim=embed_dim)


def infer_perceiver_config(state: dict[str, torch.Tensor], base: PerceiverConfig) -> PerceiverConfig:
    """Perceiver sizes from its tensors; the head split of the attention width comes from `base`."""
    try:
        _, queries, dim = state["region_queries"].shape
        inner = state["init_cross_attn.to_q.weight"].shape[0]
        classes = state["segmentation_cls_head.class_embed.weight"].shape[0] - 1
        ff_mult = state["init_ff.1.weight"].shape[0] // dim
    except KeyError as err:
        raise CheckpointError(f"perceiver checkpoint lacks {err.args[0]!r}") from None
    stages = len({k.split(".")[1] for k in state if k.startswith("conv_adapters.")})
    if inner % base.dim_head:
        raise CheckpointError(f"perceiver attention width {inner} is not a multiple of dim_head {base.dim_head}")
    return replace(base, dim=dim, num_queries=queries, num_stages=stages, heads=inner // base.dim_head,
                   num_classes=classes, ff_mult=ff_mult)


def load_official(
    lvlm_folder: str | Path,
    perceiver_file: str | Path,
    vision_file: str | Path | None = None,
    codebook_file: str | Path | None = None,
    base: MedSIGHTConfig | None = None,
) -> MedSIGHTModel:
    """Load the released files unchanged.

    Args:
        lvlm_folder: the `medsight_full_instruct/` Hugging Face folder.
        perceiver_file: `region_perceiver/0079280.pt` (stage 1).
        vision_file: the UniMed-CLIP open_clip checkpoint; may be omitted only if the LVLM folder carries the
            vision tower (paper-time saves did).
        codebook_file: optional stage-2 file (not needed to answer questions).
        Each file may be a local path or a Hub address `REPO_ID:FILENAME[@REVISION]`.
        base: config supplying what shapes cannot tell (attention head splits); default the `full` preset.
    """
    base = base or get_preset("full")
    perceiver_file = resolve_file(perceiver_file)
    vision_file = None if vision_file is None else resolve_file(vision_file)
    codebook_file = None if codebook_file is None else resolve_file(codebook_file)
    lvlm_folder = Path(lvlm_folder)
    config_path = lvlm_folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{lvlm_folder}: no config.json (is this the medsight_full_instruct folder?)")
    try:
        released = json.loads(config_path.read_text())
        if not isinstance(released, dict):
            raise ValueError("not a JSON object")
        llm = llm_config_from_released(released)
    except ValueError as err:  # malformed JSON, or a config of another kind of model
        raise CheckpointError(f"{config_path}: {err}") from None
    tokenizer = load_tokenizer(lvlm_folder)
    lm_state, tower = split_lvlm_state(read_safetensors_folder(lvlm_folder), llm.first_code_id)
    if released.get("tie_word_embeddings") is True:
        tie_output_to_input(lm_state)
    perceiver_state = read_perceiver_state(perceiver_file)
    if vision_file is not None:
        vision_state = read_vision_state(vision_file)
    elif tower:
        vision_state = {k[len("image_encoder.") :]: v for k, v in tower.items() if k.startswith("image_encoder.")}
    else:
        raise CheckpointError(
            f"no vision encoder weights: pass the UniMed-CLIP file (vision_file); {lvlm_folder} does not carry one"
        )
    # Which file is of another size (or lacks a tensor its sizes are read from) is what the user needs to know.
    try:
        vision = infer_vision_config(vision_state, base.vision)
    except CheckpointError as err:
        raise CheckpointError(f"{vision_file or lvlm_folder}: {err}") from None
    try:
        perceiver = infer_perceiver_config(perceiver_state, base.perceiver)
    except CheckpointError as err:
        raise CheckpointError(f"{perceiver_file}: {err} (base config {base.name!r})") from None
    if vision.width != perceiver.dim:  # another ViT (e.g. a ViT-B file): the perceiver reads its grid directly
        raise CheckpointError(
            f"{vision_file or lvlm_folder}: a ViT of width {vision.width}, but {perceiver_file} reads features of "
            f"width {perceiver.dim}; the release's vision encoder is {UNIMED_CLIP}"
        )
    if vision.image_size != base.vision.image_size:  # same shapes otherwise: it loads, and answers from other features
        log.warning("%s is a ViT for %d-pixel images, but base config %r (what the perceiver was trained with) "
                    "expects %d: answers will be wrong unless this is the intended vision encoder",
                    vision_file or lvlm_folder, vision.image_size, base.name, base.vision.image_size)
    config = MedSIGHTConfig(
        name=base.name,
        vision=vision,
        perceiver=perceiver,
        codebook=base.codebook,
        llm=llm,
    )
    try:
        model = _empty_model(config, tokenizer)
    except ValueError as err:  # the tokenizer's region codes do not end where config.json's vocabulary does
        raise CheckpointError(f"{lvlm_folder}: its tokenizer and config.json disagree: {err}") from None
    load_into(model.image_encoder, vision_state, str(vision_file or lvlm_folder), assign=True)
    load_into(model.region_perceiver, perceiver_state, str(perceiver_file), assign=True)
    load_into(model.language_model, lm_state, str(lvlm_folder), assign=True)
    if codebook_file is not None:
        codebook_state = read_codebook_state(codebook_file)
        if "codebooks.0.embedding.weight" not in codebook_state:
            raise CheckpointError(f"{codebook_file}: no codebook tensors (quantizer.codebooks.*) among its keys")
        code_dim = codebook_state["codebooks.0.embedding.weight"].shape[1]
        model.config.codebook = replace(config.codebook, code_dim=code_dim)
        load_into(model.attach_codebook(), codebook_state, str(codebook_file), assign=True)
    return _finish(model)


def tie_output_to_input(lm_state: dict[str, torch.Tensor]) -> None:
    """A config.json with `tie_word_embeddings: true` (the smaller Qwen3 models): transformers shares the output
    layer with the input embeddings, so `save_pretrained` leaves `lm_head.weight` out and loading ties it back; the
    embeddings stand for it here too (as they do in transformers when a file holds both). Our model keeps the two
    as separate tensors, equal when loaded: answers are the same; a training run from it trains them apart."""
    embeddings = lm_state.get("model.embed_tokens.weight")
    if embeddings is not None:  # else load_into names the missing embeddings
        lm_state["lm_head.weight"] = embeddings.clone()  # a copy: one storage under two parameters would train twice


def _empty_model(config: MedSIGHTConfig, tokenizer) -> MedSIGHTModel:
    # Parameters on the meta device: the checkpoint tensors are assigned without a second copy in memory.
    with torch.device("meta"):
        model = MedSIGHTModel(config, tokenizer)
    return model


def _finish(model: MedSIGHTModel) -> MedSIGHTModel:
    """Rebuild the buffers that checkpoints do not carry (rotary frequencies), then switch to eval."""
    lm = model.language_model
    rotary = type(lm.model.rotary_emb)
    lm.model.rotary_emb = rotary(config=lm.config, device="cpu")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"weights were never loaded for: {', '.join(leftover[:8])}")
    return model.eval()


# A trusted file the allow-list refuses is converted once (`python -m medsight.model.unpickling A.pt A.safetensors`)
# and the copy written beside it: the search takes both suffixes, and of one checkpoint the safetensors copy.
def _checkpoints(folder: Path, *patterns: str) -> list[Path]:
    """Matching .pt and .safetensors files by name (the step), a converted .safetensors copy before its .pt."""
    found = {p for pattern in checkpoint_patterns(patterns) for p in folder.glob(pattern)}
    return sorted(found, key=lambda p: (p.with_suffix("").as_posix(), p.suffix != ".safetensors"))


def _loaded(folder: Path, stage: tuple[str, ...]) -> Path | None:
    """The stage's checkpoint by the rule a download selects it with (`hub.loaded_checkpoint`)."""
    name = loaded_checkpoint((p.relative_to(folder).as_posix() for p in _checkpoints(folder, *stage)), stage)
    return None if name is None else folder / name


def _vision_files_beside(folder: Path) -> list[Path]:
    """The UniMed-CLIP-like files beside a release, one per file (a converted .safetensors copy before its .pt)."""
    first = {}
    for path in _checkpoints(folder, *VISION_FILES):
        first.setdefault(path.with_suffix("").name, path)
    return list(first.values())


def _find_official_files(folder: Path) -> dict[str, Path | None]:
    lvlm = folder / LVLM_FOLDER if (folder / LVLM_FOLDER).is_dir() else folder
    clip = _vision_files_beside(folder)
    return {
        "lvlm": lvlm,
        "perceiver": _loaded(folder, PERCEIVER_FILES),
        "vision": clip[0] if clip else None,
        "codebook": _loaded(folder, CODEBOOK_FILES),
    }


def _refuse_guessing_the_vision_file(folder: Path) -> None:
    """Of two different vision files beside a release, the first by name was loaded without a word (it could be
    another ViT's): the user says which."""
    files = [p.name for p in _vision_files_beside(folder)]
    if len(files) > 1:
        raise CheckpointError(f"{folder} holds {len(files)} vision files ({', '.join(files)}): pass the one to use "
                              "with --vision-file (vision_file= from Python)")


def resolve_source(source: str | Path) -> Path:
    """A local folder as is; anything else is taken as a Hugging Face repo id, `OWNER/NAME[@REVISION]`: only the
    files its layout needs are downloaded (sizes logged first), or, with HF_HUB_OFFLINE=1, the cached snapshot of
    that revision (default main) is used as it is."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    hub = parse_repo(str(source))
    if hub is None:
        raise CheckpointError(f"model source {source!r} is neither a folder, a built-in model "
                              f"({', '.join(sorted({*EMBEDDED, *PRESETS}))}) nor a Hugging Face repo id (OWNER/NAME, "
                              "or OWNER/NAME@REVISION)")
    try:
        return _from_hub(*hub)
    except CheckpointError as err:  # OWNER/NAME may also have been meant as a folder (`runs/final`): say it is not
        raise type(err)(f"{err} (nor is there a folder {path.resolve()})") from None


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return cached_model(repo_id, revision)
    try:
        plan = plan_release(repo_id, revision)
    except HubUnreachableError:
        # As huggingface_hub does for single files: without a connection, a cached snapshot serves (or the error
        # says the cache has none, and which revisions it has).
        folder = cached_model(repo_id, revision)
        log.warning("the Hugging Face Hub could not be reached; using the cached snapshot %s", folder)
        return folder
    log.warning("downloading (once, into the Hugging Face cache) %s", "\n  ".join(plan.lines()))
    return fetch_release(plan)


def _what_it_is(folder: Path) -> str:
    """A hint for the folders users pass by mistake: an adapter, or a part of the release layout."""
    if (folder / "adapter_config.json").is_file():
        return "; it is a LoRA adapter: pass it with --adapter (Python: adapter=) and its base model as the model"
    if folder.name in (LVLM_FOLDER, PERCEIVER_FOLDER):
        return f"; it is a part of the release layout: pass the folder that holds it, {folder.resolve().parent}"
    return ""


def _vision_needed(found: dict[str, Path | None]) -> bool:
    """True when the release folder has no UniMed-CLIP file and its LVLM does not carry the tower either."""
    if found["vision"] is not None:
        return False
    tower = "model.vision_tower.vision_tower.image_encoder."
    try:
        names = safetensors_names(found["lvlm"])
    except CheckpointError:
        return False  # a broken LVLM folder: load_official names its problem
    return not any(name.startswith(tower) for name in names)


DEVICE_FORMS = "cpu, cuda, cuda:N (N: the GPU's index) or mps"


def parse_device(device: str | torch.device) -> torch.device:
    """A device name as a torch.device; a ValueError for a malformed or unsupported one (torch's own errors list
    its internal device types). Says nothing of whether this computer has it: see `resolve_device`."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device name: use {DEVICE_FORMS}") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported: use {DEVICE_FORMS}")
    return parsed


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto: None or "" is CUDA when available, else CPU; a named one must exist here (a
    ValueError says plainly what is missing, where torch would fail later inside CUDA's start-up)."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this computer (no NVIDIA GPU or driver, "
                         "or a PyTorch build without CUDA); use cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {str(device)!r}: this computer has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: Apple's MPS is not available on this computer; use cpu")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model loads in when none is named: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    source: str | Path = "demo",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    vision_file: str | Path | None = None,
    codebook_file: str | Path | None = None,
    base_config: str | MedSIGHTConfig = "full",
    seed: int | None = None,
    fetch_vision: bool = False,
    adapter: str | Path | None = None,
) -> MedSIGHTModel:
    """Load MedSIGHT from a preset name (random weights), our saved folder, the official layout, or a Hub id.

    Args:
        source: "demo" (the embedded trained demo model), "tiny"/"full" (random weights), a folder, or a Hugging
            Face repo id such as "Caf0914/MedSIGHT" (at a revision other than main: "Caf0914/MedSIGHT@REVISION").
        device: default CUDA if available, else CPU.
        dtype: default bfloat16 on CUDA, float32 on CPU.
        vision_file: the UniMed-CLIP checkpoint for official layouts, a path or `REPO_ID:FILENAME[@REVISION]` (else
            looked for as `*clip*.pt` beside the release, then in the Hugging Face cache).
        codebook_file: optional stage-2 codebook file for official layouts (path or Hub address).
        seed: the seed a random preset is built from: default 0, and with an `adapter` the seed of the LoRA run
            that trained it (`medsight.model.adapter.adapter_base_seed`; a different seed is refused).
        base_config: preset (or config) giving what official files cannot tell, such as attention head splits.
        fetch_vision: download the UniMed-CLIP file from its authors' repository when the release needs it and
            the cache does not hold it (else the error says what to fetch, from where, under which licence).
        adapter: a LoRA adapter folder in the official layout, merged into the loaded model
            (`medsight.model.adapter.load_adapter`).
    """
    device = resolve_device(device)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # Checked before any weights are read: torch would refuse it only after the whole model had loaded.
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch.dtype: use torch.bfloat16, "
                         "torch.float32 or torch.float16")
    dtype = dtype or default_dtype(device)
    embedded = embedded_folder(source)
    if embedded is not None:
        model = load_pretrained(embedded)
    elif is_random_preset(source):
        log.warning("preset %r: random weights, for testing the pipeline only", str(source))
        if adapter is not None:
            from medsight.model.adapter import adapter_base_seed

            seed = adapter_base_seed(str(source), Path(adapter), seed)
        model = build_model(get_preset(str(source)), seed=0 if seed is None else seed).eval()
    else:
        folder = resolve_source(source)
        if (folder / CONFIG_FILE).is_file():
            model = load_pretrained(folder)
        else:
            found = _find_official_files(folder)
            if found["perceiver"] is None:
                raise CheckpointError(f"{folder}: {NO_LAYOUT}{_what_it_is(folder)}")
            base = get_preset(base_config) if isinstance(base_config, str) else base_config
            # A clone without Git LFS: say so before asking for a 5 GB vision file the clone could not use anyway.
            # (The search lists a dangling link or a folder by that name too: refused as such, not read.)
            check_user_file(found["perceiver"], "checkpoint file", CheckpointError)
            refuse_lfs_pointer(found["perceiver"])
            if vision_file is None:
                _refuse_guessing_the_vision_file(folder)
            vision = vision_file or found["vision"]
            if vision is None and _vision_needed(found):
                vision = vision_file_for_release(fetch=fetch_vision)
            model = load_official(found["lvlm"], found["perceiver"], vision, codebook_file or found["codebook"],
                                  base=base)
    if embedded is not None:
        model.weights_source = f"{source} (embedded, trained; not for clinical use)"
    elif is_random_preset(source):
        model.weights_source = f"random ({source} preset)"
    else:
        model.weights_source = str(source)
    fingerprint = None
    if adapter is not None:
        from medsight.model.adapter import base_fingerprint

        fingerprint = base_fingerprint(model)  # before the cast: float16 would round some values otherwise
    model = model.to(device=device, dtype=dtype)
    if adapter is not None:
        from medsight.model.adapter import load_adapter

        load_adapter(model, adapter, merge=True, fingerprint=fingerprint, model_name=str(source))
        model.weights_source += f" + LoRA adapter {adapter}"
    return model
