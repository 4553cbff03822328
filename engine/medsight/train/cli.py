"""`medsight train stageN|lora --config cfg.json --data DIR --out DIR [--resume]`, `medsight train plan`, and
`medsight train merge`.

`main(argv)` takes the arguments after `train` (e.g. `["stage1", "--config", ...]`). The config JSON holds fields
of the stage's config dataclass (`Stage1Config` ... `Stage5Config`, `LoraConfig` for `lora`); missing fields keep
the official defaults. The starting model is `init_from` (a preset name or a `save_pretrained` folder such as the
previous stage's `final/`). Under `torchrun --nproc-per-node N -m medsight.train.cli stageN ...` the same command
trains sharded with FSDP on N processes (see `medsight.train.loop`).

Before building the model a run is checked against the GPU's memory (`medsight.train.plan`); one that cannot fit
is refused with the configurations that would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from medsight.commands.errors import CommandParser
from medsight.commands.options import path_name
from medsight.config import PRESETS, MedSIGHTConfig, get_preset
from medsight.model.checkpoints import CONFIG_FILE, safetensors_names
from medsight.model.loading import build_model, embedded_folder, is_random_preset, load_pretrained
from medsight.model.medsight import MedSIGHTModel, holds_codebook
from medsight.train.loop import (
    DATA_CHANGED,
    TRAINED_BY_FILE,
    TrainConfig,
    TrainResult,
    check_out_dir,
    distributed_info,
    latest_checkpoint,
    read_log,
    read_trained_by,
    recorded_stages,
    run_stages,
    write_trained_by,
)
from medsight.train.stages import (
    CODEBOOK_NEEDED,
    RECIPES,
    RUNNERS,
    STAGE_CONFIGS,
    check_lora_targets,
    check_non_lora_trainables,
    initialises_code_rows,
)

COMMON_GPU_GB = (16, 24, 32, 40, 48, 80, 141)  # sizes GPUs are sold by (decimal GB)


def config_fields_help() -> str:
    """The --config fields of each stage with their defaults, read off the config classes so the help cannot drift."""
    kinds = {**{f"stage{n}": kind for n, kind in sorted(STAGE_CONFIGS.items())},
             **{name: kind for name, (_, kind) in RECIPES.items()}}
    lines = [textwrap.fill("--config fields (a JSON object; a field left out keeps the default shown, the official "
                           "setting; init_from \"tiny\" and \"full\" are random weights, \"demo\" the embedded "
                           "trained model):", width=100)]
    for name, kind in kinds.items():
        fields = ", ".join(f"{f.name}={json.dumps(getattr(kind(), f.name))}" for f in dataclasses.fields(kind))
        lines.append(textwrap.fill(f"{name}: {fields}", width=100, subsequent_indent="  "))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="medsight train", description=textwrap.fill(
                          "Train one MedSIGHT stage. Also: `medsight train plan --help` (memory per GPU), "
                          "`medsight train merge --help` (merge a LoRA adapter).", width=100),
                      epilog=config_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*(f"stage{n}" for n in sorted(RUNNERS)), *RECIPES],
                   help="which stage to train; lora: stage 5 with the official LoRA recipe")
    p.add_argument("--config", type=path_name, help="JSON with stage config fields (below; default: official settings)")
    p.add_argument("--data", type=path_name, required=True,
                   help="stages 1-2: meta JSON or folder with biomedparse_meta_train.json; "
                        "stages 3-5: conversation JSON or folder with lvlm/train.json")
    p.add_argument("--out", type=path_name, required=True, help="output folder (logs, plot, checkpoints, final/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--data-changed", action="store_true",
                   help="with --resume: continue although --data's content differs from the run's (a checkpoint "
                        "records a fingerprint of the data JSON), for an edit made on purpose: corrected answers or "
                        "labels, or paths moved, with the same items in the same order")
    p.add_argument("--any-start", action="store_true",
                   help="train although init_from is the output of a later stage, or of one that skips a stage "
                        "(refused by default: trained_by.json in the folder says which stage wrote it)")
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="worker processes per process that read the samples while a step computes (overrides the "
                        "config's num_workers; 0: read between steps; default automatic: 0 on the CPU, up to 4 on a "
                        "GPU); the batches are the same with any number")
    p.add_argument("--gpu-memory", type=float,
                   help="GiB per GPU to plan for (default: the CUDA device's memory; no check on CPU)")
    return p


def plan_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="medsight train plan",
                                description="Memory per GPU of each stage: plain, FSDP and LoRA on 1-8 GPUs.")
    p.add_argument("--model", default="full", help="preset name or a save_pretrained folder (default: full)")
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="worker processes per process that read the samples while a step computes (overrides the "
                        "config's num_workers; 0: read between steps; default automatic: 0 on the CPU, up to 4 on a "
                        "GPU); the batches are the same with any number")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="medsight train merge",
                                description="Merge a LoRA adapter (official layout) into its base model.")
    p.add_argument("--model", required=True, help="the base model (preset, folder or Hub id)")
    p.add_argument("--adapter", required=True, type=path_name, help="adapter folder (adapter_config.json ...)")
    p.add_argument("--out", required=True, type=path_name, help="folder for the merged model in our format")
    p.add_argument("--seed", type=int, help="a preset --model (random weights) is rebuilt from the LoRA run's seed: "
                   "default the seed in the run's train_config.json beside the adapter")
    return p


def load_config(stage: int, path: Path | None, kind: type[TrainConfig] | None = None) -> TrainConfig:
    kind = kind or STAGE_CONFIGS[stage]
    return kind.from_json(path) if path is not None else kind()


def check_init_from(init_from: str) -> None:
    """`init_from` must name a preset or a folder written by `save_pretrained` (checked before anything is built)."""
    if init_from in PRESETS:
        return
    folder = Path(init_from)
    if not folder.is_dir():
        raise ValueError(f"init_from {init_from!r}: unknown preset or folder; use a preset "
                         f"({', '.join(sorted(PRESETS))}) or a folder written by save_pretrained (e.g. a run's final/)")
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"init_from {init_from!r}: the folder has no {CONFIG_FILE}; use a folder written by "
                         "save_pretrained (e.g. a run's final/)")


def model_config(init_from: str) -> MedSIGHTConfig | None:
    """The architecture a run starts from, without building it (None when it cannot be told cheaply)."""
    if is_random_preset(init_from):
        return get_preset(init_from)
    path = Path(embedded_folder(init_from) or init_from) / CONFIG_FILE
    return MedSIGHTConfig.from_json(path) if path.is_file() else None


def check_lora_config(config: TrainConfig) -> None:
    """A LoRA run's `lora_targets` and `non_lora_trainables` against the model it starts from, built on the meta
    device (no weights): a bad entry is named before minutes go into building or loading the full model and reading
    the data."""
    if not getattr(config, "lora", False):
        return
    arch = model_config(config.init_from)  # reads a folder's config.json: only for a LoRA run
    if arch is None:
        return
    from medsight.model.sizes import meta_model

    language_model = meta_model(arch).language_model
    check_lora_targets(language_model, config.lora_targets)
    names = [n for n, _ in language_model.named_parameters()]
    check_non_lora_trainables(names, config.non_lora_trainables, with_lora=False)


#: The stage each run name stands for in the recipe's order (a LoRA run and a merged adapter are stage 5).
STAGE_OF_RUN = {"stage1": 1, "stage2": 2, "stage3": 3, "stage4": 4, "stage5": 5, "stage5-lora": 5}
#: What each stage trains, for the messages of `check_stage_order`.
STAGE_TRAINS = {1: "the Region Perceiver", 2: "the codebook", 3: "mm_projector",
                4: "token_projection and the region-code rows (initialised from the codebook)",
                5: "the language model"}
#: The stages whose parts each stage trains on top of: every earlier one, except that stage 3 does not use the
#: codebook (stage 2), so the recipe may run stage 2 after stage 3 (stage 4 refuses a model without a codebook:
#: `check_codebook`).
BUILDS_ON = {1: frozenset(), 2: frozenset({1}), 3: frozenset({1}), 4: frozenset({1, 2, 3}),
             5: frozenset({1, 2, 3, 4})}


def trained_by(folder: Path) -> tuple[str | None, dict, Path]:
    """The run name a model folder records last (`write_trained_by`; None for a preset, a release, an older folder),
    the whole record and its path."""
    path = folder / TRAINED_BY_FILE
    record = read_trained_by(folder)
    stage = record.get("stage")
    return (stage if isinstance(stage, str) else None), record, path


def stages_done(runs: Sequence[str]) -> set[int]:
    """The stages a model went through, from the runs its record lists: those, and every stage before the first
    listed one (that run started from a preset, a release or a folder without a record, which are not judged)."""
    known = [STAGE_OF_RUN[r] for r in runs if r in STAGE_OF_RUN]
    return set(known) | set(range(1, known[0])) if known else set()


def stages_text(stages: Sequence[int]) -> str:
    """"stage 3", "stages 3-4" (consecutive) or "stages 2, 4"."""
    if len(stages) == 1:
        return f"stage {stages[0]}"
    consecutive = list(stages) == list(range(stages[0], stages[-1] + 1))
    return f"stages {stages[0]}-{stages[-1]}" if consecutive else "stages " + ", ".join(map(str, stages))


def check_stage_order(stage: int, config: TrainConfig, out: Path, resume: bool) -> None:
    """A run starts from a model that went through the stages it trains on top of (`BUILDS_ON`), and through no stage
    that trained on top of its own part. Started after such a stage it retrains a part that stage's part was trained
    against (stage 2 on a stage-4 output: the code rows were derived from the codebook it changes); started past a
    skipped stage, the part that stage trains is never trained (a LoRA run on a stage-3 output keeps untrained code
    rows). Both gave a model without a word; they are refused from the stages the folder's `trained_by.json` lists
    (all of them: 1, 3, then 2 is the recipe's order too) before anything is built, and `--any-start` allows them
    (an ablation). A resumed run takes its weights from its checkpoint, and a folder without a record is not
    judged."""
    if (resume and latest_checkpoint(out)) or is_random_preset(config.init_from):
        return
    folder = Path(embedded_folder(config.init_from) or config.init_from)
    run, record, path = trained_by(folder)
    runs = recorded_stages(record)
    done = stages_done(runs)
    later = sorted(k for k in done if k > stage and stage in BUILDS_ON[k])
    skipped = sorted(BUILDS_ON[stage] - done)
    if not done or not (later or skipped):
        return
    if later:
        why = (f"stage {stage} would retrain {STAGE_TRAINS[stage]} under the parts {stages_text(later)} trained on "
               "top of it")
    else:
        why = (f"stage {stage} would skip {stages_text(skipped)}, which train{'s' if len(skipped) == 1 else ''} "
               + ", then ".join(STAGE_TRAINS[k] for k in skipped))
    start = "a preset" if stage == 1 else f"the final/ of a stage-{stage - 1} run"
    through = f"; it went through {', '.join(runs)}" if len(runs) > 1 else ""
    raise ValueError(f"init_from {config.init_from!r} is the output of a {run} run ({path}{through}): {why}. Start "
                     f"from {start}, or from a stage-{stage} output to train on; or pass --any-start to train from "
                     "it anyway")


def check_codebook(stage: int, config: TrainConfig, out: Path, resume: bool) -> None:
    """Stage 4 initialises the code rows from the stage-2 codebook: a start model without one is refused from the
    names in its weights file, before it is built or loaded (minutes for the full model)."""
    if stage != 4 or not initialises_code_rows(config, out, resume):
        return
    folder = None if is_random_preset(config.init_from) else embedded_folder(config.init_from) or config.init_from
    if folder is None or not holds_codebook(safetensors_names(folder)):
        raise ValueError(f"init_from {config.init_from!r}: {CODEBOOK_NEEDED}")
    check_code_rows(Path(folder), config.init_from)


#: Runs whose outputs hold trained region-code rows (stage 5 trains the whole input embedding; a merged LoRA
#: adapter, "stage5-lora", records whether its rows are trained: `merged_code_rows_trained`).
TRAINS_CODE_ROWS = ("stage4", "stage5", "stage5-lora")
#: Runs whose outputs hold the code rows as built, untrained.
KEEPS_CODE_ROWS = ("stage1", "stage2", "stage3")


def check_code_rows(folder: Path, init_from: str) -> None:
    """Stage 4's `init_code_embeddings` overwrites the code rows with their initial values: started from the output of
    a stage 4 or 5 run (to train on), it silently discarded what that run had trained into them."""
    stage, record, path = trained_by(folder)
    if record.get("code_rows_trained", stage in TRAINS_CODE_ROWS):
        raise ValueError(f"init_from {init_from!r} is the output of a {stage} run ({path}): its region-code rows are "
                         "trained, and init_code_embeddings would overwrite them with their initial values. Set "
                         "init_code_embeddings to false to train on from them, or start from a stage-3 output")


def merged_code_rows_trained(model: str, adapter: Path) -> bool:
    """Whether a model merged from base `model` and `adapter` holds trained code rows: the base's are (a stage-4/5
    output, or a model without a record such as a release), or the adapter trains the input embedding (LoRA on
    embed_tokens, or embed_tokens among its non-LoRA trainables). A random preset's rows are untrained."""
    from medsight.model.adapter import read_non_lora, saved_adapter_names

    if any("embed_tokens" in name for name in (*saved_adapter_names(adapter), *read_non_lora(adapter))):
        return True
    if is_random_preset(model):
        return False
    return trained_by(Path(embedded_folder(model) or model))[0] not in KEEPS_CODE_ROWS


def initial_model(config: TrainConfig) -> MedSIGHTModel:
    """The model a run starts from (a resumed run overwrites its weights from the checkpoint): a name means what it
    means to `load_model`, so an embedded trained model ("demo") is fine-tuned, not rebuilt with random weights
    (an adapter trained on those would be applied to the trained ones by ask, serve, eval and merge)."""
    if is_random_preset(config.init_from):
        return build_model(get_preset(config.init_from), seed=config.seed)
    return load_pretrained(embedded_folder(config.init_from) or config.init_from)


def gpu_memory_gib(requested: float | None) -> float | None:
    if requested is not None:
        return requested
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(distributed_info()[2]).total_memory / 1024**3


def check_memory(stage: int, config: TrainConfig, requested: float | None) -> None:
    from medsight.train.plan import check_fits

    gib = gpu_memory_gib(requested)
    arch = model_config(config.init_from)
    if gib is None or arch is None:
        return
    world = distributed_info()[1]
    mode = "lora" if getattr(config, "lora", False) else ("fsdp" if world > 1 else "plain")
    batch = config.batch_size * world if stage in (1, 2) else 1
    check_fits(arch, stage, mode, world, gib, batch)


def plan_main(argv: Sequence[str]) -> int:
    from medsight.train.plan import GIB, count_parameters, memory_per_gpu, plan_table

    args = plan_parser().parse_args(argv)
    config = model_config(args.model)
    if config is None:
        raise ValueError(f"{args.model}: not a preset or a folder with {CONFIG_FILE}")
    counts = count_parameters(config)
    batches = {1: STAGE_CONFIGS[1]().batch_size, 2: STAGE_CONFIGS[2]().batch_size}
    print(f"{config.name} model: {counts.total:,} parameters ({counts.language_model:,} in the language model); "
          f"GiB per GPU, * = more than {args.gpu_memory:g} GiB\n")
    print(plan_table(config, args.gpu_memory, batches))
    lora = memory_per_gpu(config, counts, 5, "lora", 1) / GIB
    fits = [gb for gb in COMMON_GPU_GB if gb * 1e9 / GIB >= lora]
    smallest = f"a {fits[0]} GB GPU" if fits else "no single GPU"
    print(f"\nLoRA (stage 5 / fine-tuning) needs {lora:.1f} GiB on one GPU: the smallest that fits is {smallest}.")
    return 0


def check_merge_out(out: Path) -> None:
    """The merged model goes into a new or empty folder: `save_pretrained` would otherwise replace the weights and
    config of whatever model the folder holds (the base model itself, when --out repeats --model)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the merged model")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"--out {out} is not empty ({shown}); merge into a new or empty folder (nothing in it is "
                         "replaced)")


def merge_main(argv: Sequence[str]) -> int:
    import torch

    from medsight.model.loading import load_model, save_pretrained

    args = merge_parser().parse_args(argv)
    check_merge_out(args.out)
    if args.seed is not None and not is_random_preset(args.model):
        random = ", ".join(sorted(p for p in PRESETS if is_random_preset(p)))
        raise ValueError(f"--seed applies to a preset --model ({random}), whose weights are random; {args.model} "
                         "has its own")
    # A preset's seed: the LoRA run's, checked against --seed (`adapter_base_seed`, as for ask, serve and eval).
    model = load_model(args.model, device="cpu", dtype=torch.float32, adapter=args.adapter, seed=args.seed)
    folder = save_pretrained(model, args.out)
    # A merged model can be an init_from: recorded as a stage-5 output (`check_stage_order`), with whether its code
    # rows are trained (the stage-4 code-row check): they are the base's, or the adapter's where it trains them.
    write_trained_by(folder, "stage5-lora", 0, run_stages(args.model, "stage5-lora"), base_model=args.model,
                     adapter=str(args.adapter), code_rows_trained=merged_code_rows_trained(args.model, args.adapter))
    print(folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = parser().parse_args(argv)
    if args.data_changed and not args.resume:
        raise ValueError("--data-changed applies to a resumed run: pass it with --resume")
    # force: under `medsight train` the top-level command has configured logging (WARNING) already, and without it
    # this call did nothing: the run's progress ("step n/N loss ...") was never shown.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    if args.stage in RECIPES:
        stage, kind = RECIPES[args.stage]
    else:
        stage, kind = int(args.stage.removeprefix("stage")), None
    config = load_config(stage, args.config, kind)
    if args.num_workers is not None:
        config = dataclasses.replace(config, num_workers=args.num_workers)  # checked as a config value
    check_out_dir(args.out, args.resume)  # the loop checks again; this fails before the model is built
    check_init_from(config.init_from)
    check_lora_config(config)
    if not args.any_start:
        check_stage_order(stage, config, args.out, args.resume)
    check_codebook(stage, config, args.out, args.resume)
    check_memory(stage, config, args.gpu_memory)
    model = initial_model(config)
    resume = DATA_CHANGED if args.data_changed else args.resume
    result = RUNNERS[stage](model, args.data, config, args.out, resume=resume)
    if distributed_info()[0] == 0:  # under torchrun one line, from the rank that wrote final/
        print(json.dumps(summary(args.stage, result, args.out)))
    return 0


def summary(stage: str, result: TrainResult, out: Path) -> dict:
    """The line `medsight train` prints: `new_steps` says how many steps this command trained; a resume of a run
    that had already finished trains none and reports the loss its log holds for that step."""
    if result.records:
        last = result.records[-1]
    else:
        last = next((r for r in read_log(out) if r.get("step") == result.last_step), {})
    return {"stage": stage, "steps": result.last_step, "new_steps": len(result.records),
            "final": str(result.final_dir), "last_loss": last.get("loss")}


if __name__ == "__main__":
    # The entry point under torchrun (`-m medsight.train.cli`): errors, Ctrl+C and a reader that left as in `medsight`.
    from medsight.commands.errors import run_command

    sys.exit(run_command(main, "medsight train"))
