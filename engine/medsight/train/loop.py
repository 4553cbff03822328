"""The trainer core shared by all five stages: config, seeding, loop, logs, plot, checkpoints and exact resume.

Layout of an output folder::

    out_dir/
      train_config.json          the stage config the run was started with
      loss_log.jsonl             one record per logged optimizer step (step, lr, loss, loss terms, grad_norm)
      loss.png                   loss curves (rewritten at every save)
      checkpoints/step-0000010/  single process: `save_pretrained` folder (a LoRA run: its adapter folder,
                                 `CheckpointWeights`) + trainer_state.pt (optimizer, scheduler, step, RNG);
                                 torchrun: sharded/ (DCP; a LoRA run: its trained tensors, and its adapter folder)
                                 + trainer_state.json + rng-rank{r}.json
      final/                     `save_pretrained` folder of the last step, with trained_by.json (stage, steps, stages),
                                 as every step checkpoint and final_official/ (`write_trained_by`)

Data order is a pure function of (seed, epoch, position): a fresh permutation of the dataset per epoch from a
seeded generator, consumed continuously across epoch ends. A checkpoint therefore only records how many samples the
run has consumed (its position), and the step after a resume sees exactly the samples (and, with the restored
RNG/optimizer/scheduler, the loss) of an uninterrupted run. A torchrun run resumed on another number of processes
continues from that position (its global batch changes with the number of processes; with `epochs`, the steps left
are counted from the samples left), one process without torchrun included; a single-process checkpoint is not
resumed under torchrun.

Distributed: under `torchrun` (WORLD_SIZE > 1) the model is sharded with PyTorch's FSDP2 (`medsight.train.fsdp`:
per decoder layer, mixed precision over float32 master weights) and every rank takes its own slice of each step's
samples (what a DistributedSampler does); gradients are reduce-scattered by FSDP. Checkpoints are then
`torch.distributed.checkpoint` shards; `final/` is gathered on rank 0 into our format. Only rank 0 writes logs;
the loss terms it logs are means over all ranks (the global batch) and `grad_norm` is the whole gradient's norm.

Trainer state is read back without unpickling arbitrary objects (`medsight.train.state`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medsight.atomic_files import replace_file, sync_tree
from medsight.model import loading
from medsight.model.checkpoints import CheckpointError, load_into, read_safetensors_folder
from medsight.model.loading import DEVICE_FORMS, parse_device, save_pretrained
from medsight.train import checks, fsdp
from medsight.train import state as trainer_state
from medsight.train.reading import MicroBatchIndices, StepReader, Unreadable, auto_workers
from medsight.user_files import read_user_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
OFFICIAL_DIR = "final_official"
#: In `final/`: which run wrote it (`{"stage": name, "steps": n}`), so that a later stage can tell what its
#: init_from has been trained by (`medsight.train.cli.check_code_rows`).
TRAINED_BY_FILE = "trained_by.json"
STATE_FILE = "trainer_state.pt"
SHARDED_STATE_FILE = "trainer_state.json"
LOG_FILE = "loss_log.jsonl"
PLOT_FILE = "loss.png"
CONFIG_FILE = "train_config.json"


def _is_device(name: str) -> bool:
    """A config's device is checked as a name only: it may be written on a computer without that device."""
    try:
        return not name or bool(parse_device(name))
    except ValueError:
        return False


@dataclass
class TrainConfig:
    """Settings common to every stage (the stage configs override the defaults with the official values).

    Attributes:
        init_from: model to start from when run from the CLI: a preset name ("tiny", "full": random weights from
            `seed`; "demo": the embedded trained model, as `load_model` reads the name) or a folder written by
            `save_pretrained` (e.g. the previous stage's `final/`).
        lr: peak learning rate.
        max_steps: optimizer steps; 0 derives them from `epochs`.
        epochs: passes over the data when `max_steps` is 0 (may be fractional).
        batch_size: samples per micro-batch on each process; a step's samples (batch_size x grad_accum x
            processes) may not exceed the data set's (`check_batch_fits`).
        grad_accum: micro-batches per optimizer step.
        grad_clip: max global gradient norm (<= 0 disables clipping).
        optimizer: "adam" or "adamw" (torch implementations).
        betas, weight_decay, eps: optimizer hyper-parameters.
        warmup_ratio: linear warm-up over this fraction of the steps, then cosine decay.
        min_lr: floor of the cosine decay (at most `lr`).
        seed: seeds python, numpy and torch, and the data order.
        bf16: run the forward under bfloat16 autocast (weights and optimizer stay float32).
        fsdp_param_dtype: under torchrun, the dtype FSDP units compute in over float32 master weights: "auto"
            (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16" or "float32".
        export_official: also write `final_official/` in the release layout (`medsight.train.export`); refused
            for LoRA runs, whose `final/` is already the official adapter layout.
        gradient_checkpointing: recompute the language model's layers in backward (HF gradient checkpointing).
        log_every: write a loss record every this many steps (the last step is always written).
        save_every: write a resumable checkpoint every this many steps (0: only at the end).
        save_total_limit: keep only this many of the newest checkpoints (0: keep all), as the HF Trainer's option of
            that name; an older one is removed only once a newer one is complete. A full-model checkpoint holds
            the weights and the optimizer's moments, so a long run fills a disk without it.
        device: "" picks CUDA when available, else CPU; under torchrun "" and "cuda" are each process's GPU
            (`process_device_name`).
        num_workers: DataLoader worker processes per process that read the samples (decode, resize, tokenise)
            while the step computes; 0 reads them in the main process between steps; -1 (default) is automatic:
            0 on the CPU (the step uses every core), else up to 4, as the cores allow (`auto_workers`). Batches,
            their order and a resume are the same with any number (`medsight.train.reading`).
    """

    init_from: str = "tiny"
    lr: float = 1e-4
    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_ratio: float = 0.0
    min_lr: float = 0.0
    seed: int = 0
    bf16: bool = False
    fsdp_param_dtype: str = "auto"
    export_official: bool = False
    gradient_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 0
    save_total_limit: int = 0
    device: str = ""
    num_workers: int = -1

    # Range of each field (types come from the annotations); subclasses add theirs in their own `_limits`
    # (a ClassVar, so not a dataclass field).
    _limits: ClassVar[dict[str, checks.Limit]] = {
        "init_from": ((lambda v: bool(str(v).strip())), "a preset name or a model folder"),
        "lr": checks.positive(),
        "max_steps": checks.at_least(0, note="0: derive the steps from epochs"),
        "epochs": checks.positive(),
        "batch_size": checks.at_least(1),
        "grad_accum": checks.at_least(1),
        "optimizer": checks.one_of("adam", "adamw"),
        "betas": ((lambda v: all(0 <= b < 1 for b in v)), "two numbers from 0 to 1 (excluded)"),
        "weight_decay": checks.at_least(0, "a number"),
        "eps": checks.positive(),
        "warmup_ratio": checks.fraction(),
        "min_lr": checks.at_least(0, "a number"),
        "seed": checks.at_least(0),
        "fsdp_param_dtype": checks.one_of("auto", *fsdp.PARAM_DTYPES),
        "log_every": checks.at_least(1),
        "save_every": checks.at_least(0, note="0: only at the end"),
        "save_total_limit": checks.at_least(0, note="0: keep every checkpoint"),
        "device": (_is_device, f'"" (auto), {DEVICE_FORMS}'),
        "num_workers": checks.at_least(-1, note="-1: automatic, 0: read in the main process"),
    }

    def __post_init__(self) -> None:
        # Also guards configs built in code: a bad value fails here, not steps later inside the loop.
        limits: dict[str, checks.Limit] = {}
        for klass in reversed(type(self).__mro__):
            limits.update(vars(klass).get("_limits", {}))
        checks.check_limits(self.to_dict(), limits)
        if self.min_lr > self.lr:
            # The cosine decays from lr to min_lr: above lr it would climb past the peak the config asks for (a
            # stage-1 config with lr 1e-7 kept the default min_lr 1e-6 and ended at 8.7x its lr).
            raise ValueError(f"field 'min_lr' is {self.min_lr:g} (number); expected a number <= lr ({self.lr:g}): "
                             "the floor the schedule decays to from lr")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        """Build from a JSON-like dict, checking each value's type and range.

        Unknown fields are an error (typos would otherwise be silently ignored).
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object of {cls.__name__} fields, got a {checks.json_kind(data)}")
        unknown = checks.unknown_fields(data, (f.name for f in dataclasses.fields(cls)))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        hints = get_type_hints(cls)
        return cls(**{k: checks.coerce(k, v, hints[k]) for k, v in data.items()})

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        data = read_user_json(path, f"{cls.__name__} config file")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


C = TypeVar("C", bound=TrainConfig)


#: Writes a model's weights into a folder from (folder, gathered state or None for the model's own); returns it.
Finalize = Callable[[Path, "dict[str, torch.Tensor] | None"], Path]


@dataclass(frozen=True)
class CheckpointWeights:
    """How a step checkpoint holds the model's weights, where not the whole model (a LoRA run: only the adapter and
    the other trained tensors, in its `final/`'s layout; the frozen base is the run's init_from). `save(folder,
    state)` writes them from the model, or from `state` (the trained tensors gathered under torchrun, by the model's
    names); `load(folder)` puts them back into the model (single process), refusing what does not fit; `check(folder)`
    refuses a checkpoint of another base (torchrun, whose DCP shards then hold only the trained tensors);
    `is_saved(folder)`: whether a checkpoint holds them in this form (else it is read as a whole model)."""

    save: Finalize
    load: Callable[[Path], None]
    check: Callable[[Path], None]
    is_saved: Callable[[Path], bool]


@dataclass
class TrainResult:
    """What a run returns: the per-step records written (this process) and where things are."""

    records: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None
    last_step: int = 0
    runner: nn.Module | None = None  # the model, or under torchrun its FSDP root (a LossModule)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def process_device_name(name: str, world: int, local_rank: int) -> str:
    """The device a process trains on, by name. Under torchrun (`world` > 1) "cuda" is this process's GPU
    (cuda:LOCAL_RANK), as when no device is named: as it stood, every process went to the current GPU and
    `torch.cuda.set_device` refused a CUDA device without an index. Another process's GPU index is refused: every
    process would train on that one GPU."""
    parsed = parse_device(name) if name and world > 1 else None
    if parsed is None or parsed.type != "cuda":
        return name
    if parsed.index is None:
        return f"cuda:{local_rank}"
    if parsed.index != local_rank:
        raise ValueError(f"device {name!r} under torchrun: process {local_rank} of this computer would train on "
                         f"GPU {parsed.index}, as would every other; use \"cuda\" or \"\" (each process takes the "
                         "GPU of its local rank)")
    return name


def resolve_device(config: TrainConfig) -> torch.device:
    """The config's device (which must exist on this computer; under torchrun "cuda" is this process's GPU), else
    this process's GPU (its torchrun local rank), else the CPU."""
    if config.device:
        _, world, local_rank = distributed_info()
        return loading.resolve_device(process_device_name(config.device, world, local_rank))
    if torch.cuda.is_available():
        return torch.device("cuda", distributed_info()[2])
    return torch.device("cpu")


def cosine_lambda(total: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up from 0, then cosine from 1 down to `min_ratio` (Hugging Face's
    cosine schedule with warm-up, which the official stages 3-5 used through its Trainer)."""
    warmup = math.ceil(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(params: Sequence[nn.Parameter] | Sequence[dict[str, Any]],
                    config: TrainConfig) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if config.optimizer not in kinds:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adam' or 'adamw'")
    return kinds[config.optimizer](
        list(params), lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )


def check_batch_fits(config: TrainConfig, num_samples: int, world_size: int = 1) -> None:
    """Refuse an optimizer step that reads more samples than the data set holds: the stream of epoch permutations
    would put the same samples into one step's gradient twice or more (batch_size 20 on 8 images trained one step
    on 2.5 copies of them), where a PyTorch DataLoader gives a smaller batch or, with drop_last, no step at all."""
    per_step = config.batch_size * config.grad_accum * world_size
    if 0 < num_samples < per_step:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"batch_size {config.batch_size} x grad_accum {config.grad_accum}{processes} = {per_step} "
                         f"samples per optimizer step, but the training data holds {num_samples}: one step would "
                         "count samples more than once. Lower batch_size or grad_accum"
                         + (" or run on fewer processes" if world_size > 1 else ""))


def total_steps(config: TrainConfig, num_samples: int, world_size: int = 1) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * num_samples / per_step))


class SampleOrder:
    """Global sample index for any position in the stream: one seeded permutation per epoch."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples <= 0:
            raise ValueError("the training data set is empty")
        self.num_samples, self.seed = num_samples, seed
        self._cache: dict[int, list[int]] = {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch not in self._cache:
            self._cache = {epoch: self._permutation(epoch)}  # one epoch at a time is enough: positions only grow
        return self._cache[epoch][offset]

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a whole checkpoint: its trainer state is written last (`save_checkpoint`)."""
    return (folder / STATE_FILE).is_file() or (folder / SHARDED_STATE_FILE).is_file()


def _checkpoint_folders(out_dir: str | Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """The run's checkpoint folders by step: (complete ones, holding their trainer state; ones a kill left torn)."""
    complete, torn = {}, {}
    for folder in (Path(out_dir) / CHECKPOINT_DIR).glob("step-*"):
        number = folder.name.removeprefix("step-")
        if number.isdigit():
            (complete if is_complete_checkpoint(folder) else torn)[int(number)] = folder
    return complete, torn


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint folder with the highest step that has a trainer state, or None.

    Ordered by the step number, not the name: `step-{step:07d}` grows an eighth digit past 9,999,999 steps."""
    complete, _ = _checkpoint_folders(out_dir)
    return complete[max(complete)] if complete else None


def remove_old_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest complete checkpoints (0: keep all), and the folders older than the newest
    complete one that a kill left torn; returns the folders removed. The newest is never removed, so a resume
    always has it."""
    complete, torn = _checkpoint_folders(out_dir)
    if keep <= 0 or not complete:
        return []
    newest = max(complete)
    old = [complete[n] for n in sorted(complete)[:-keep]] + [f for n, f in torn.items() if n < newest]
    for folder in old:
        shutil.rmtree(folder)
    return old


#: What marks a folder as holding a run: starting a new run there would overwrite or mix with it.
RUN_MARKERS = (CONFIG_FILE, LOG_FILE, CHECKPOINT_DIR, FINAL_DIR)
#: Config fields a resume may change: they lengthen the run (max_steps, epochs; the cosine then spans the new
#: length), or change what is written, where it runs or where its files are read from (data_root: data moved to
#: another disk; checkpoints record the data's size) or by how many processes (num_workers), never what a step
#: computes. Any other difference is refused.
RESUMABLE_CHANGES = ("max_steps", "epochs", "log_every", "save_every", "save_total_limit", "export_official",
                     "device", "gradient_checkpointing", "data_root", "num_workers")


def check_out_dir(out_dir: str | Path, resume: bool) -> None:
    """Refuse to start a new run in a folder that holds one (it would overwrite its config, log and `final/`, and
    leave its checkpoints for a later --resume to pick up), and an --out that is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the output must be a folder")
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if found and not resume:
        raise ValueError(f"{out} already holds a training run ({', '.join(found)}); pass --resume to continue it, "
                         "or choose another --out folder")


def check_resume_config(out_dir: str | Path, config: TrainConfig) -> None:
    """Refuse a resume whose config differs from the run's saved one outside `RESUMABLE_CHANGES`."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        return  # checkpoints copied on their own, or a run that never started: nothing to compare with
    saved = read_user_json(path, "saved training config")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, got a {checks.json_kind(saved)}")
    current = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as saved
    # A field the run's version did not have yet took its default there (a newer version must resume older runs).
    defaults = json.loads(json.dumps(type(config)().to_dict()))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    missing = object()
    differ = [k for k in sorted(saved.keys() | current.keys())
              if k not in RESUMABLE_CHANGES and not _same_setting(k, saved.get(k, missing), current.get(k, missing))]
    if differ:
        changes = "; ".join(f"{k}: {json.dumps(saved.get(k))} in the run, {json.dumps(current.get(k))} now"
                            for k in differ)
        raise ValueError(f"cannot resume the run in {path.parent}: the config differs from its {CONFIG_FILE} "
                         f"({changes}). Resume with the run's settings (only {', '.join(RESUMABLE_CHANGES)} may "
                         "change), or start a new run in another --out folder")


def _same_setting(name: str, saved: Any, current: Any) -> bool:
    """Equal settings; `init_from` names a folder in either spelling (relative or absolute) or a preset."""
    if name == "init_from" and isinstance(saved, str) and isinstance(current, str) and saved != current:
        return Path(saved).exists() and Path(current).exists() and Path(saved).resolve() == Path(current).resolve()
    return saved == current


def read_log(out_dir: str | Path) -> list[dict[str, float]]:
    """The run's loss records; a line that is not one (e.g. cut short by a full disk) is a ValueError naming it.

    Except a last line without its newline that is not JSON: the append of a process killed mid-write, expected
    after a kill. It is dropped with a warning; nothing is lost, as its step's checkpoint is saved only after the
    append, so a resume continues from an earlier step and drops the records past that one anyway."""
    path = Path(out_dir) / LOG_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s: dropped line %d, cut short when the run was stopped while writing it", path, number)
                break
            raise ValueError(f"{path}: line {number} is not a loss record ({err}); remove it to resume") from None
    return records


def plot_losses(records: Sequence[dict[str, float]], path: str | Path, title: str = "") -> None:
    """One PNG with the total loss and every logged term against the step (log-scaled y when all positive)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    skip = {"step", "lr", "grad_norm", "time", "epoch"}
    keys = [k for k in (records[0] if records else {}) if k not in skip]
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = [r["step"] for r in records]
    for key in keys:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key, linewidth=2 if key == "loss" else 1)
    values = [r[k] for r in records for k in keys if k in r]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    params: Sequence[nn.Parameter] | Sequence[dict[str, Any]],
    dataset: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    loss_fn: Callable[[Any], dict[str, torch.Tensor]],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool | str = False,
    name: str = "train",
    grad_masks: dict[str, torch.Tensor] | None = None,
    finalize: Finalize | None = None,
    weights: CheckpointWeights | None = None,
) -> TrainResult:
    """Optimise `params` of `model` on `dataset` with `loss_fn(collate(samples))["loss"]`.

    Args:
        model: the MedSIGHTModel (saved whole with `save_pretrained`; loaded back strictly on resume).
        params: the trainable parameters (the caller has already set `requires_grad`), or optimizer param groups
            (dicts with "params" and per-group settings such as "lr").
        dataset: indexable samples.
        collate: list of samples -> the batch `loss_fn` takes.
        loss_fn: batch -> dict with "loss" (backpropagated) and other scalar terms (logged).
        resume: continue from the latest checkpoint in `out_dir/checkpoints` (fresh start if there is none). Without
            it, an `out_dir` that holds a run is refused; with it, a config that differs from the run's saved one
            outside `RESUMABLE_CHANGES` is refused (`check_out_dir`, `check_resume_config`), and so is data other
            than the run's (`check_data`) unless `resume` is `DATA_CHANGED`.
        name: run name for logs and the plot title.
        grad_masks: parameter name (in `model`) -> mask multiplied into its gradient before clipping (stage 4
            trains only some rows of the input embedding this way).
        finalize: writes `final/` from (folder, gathered state or None for `model.state_dict()`); default
            `save_pretrained`. Runs on rank 0 only.
        weights: what a step checkpoint holds of the model (default: all of it).
    """
    out = Path(out_dir)
    stages = run_stages(config.init_from, name)  # recorded in each model folder the run writes
    # Before anything is written (and, under torchrun, before the ranks meet, so no rank sees rank 0's files).
    check_out_dir(out, resume)
    if resume:
        check_resume_config(out, config)
    rank, world, _ = distributed_info()
    main_process = rank == 0
    groups = _param_groups(params)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("nothing to train: no parameter requires a gradient")
    check_batch_fits(config, len(dataset), world)
    data = DataIdentity.of(dataset)
    order = SampleOrder(len(dataset), config.seed)  # refuses an empty data set before --out holds a "run"
    seed_everything(config.seed)
    steps = total_steps(config, len(dataset), world)
    device = next(model.parameters()).device
    sharded = world > 1
    runner: nn.Module = model
    if sharded:
        # Parameters are replaced by their shards: remember the groups by name and look them up afterwards.
        names = {id(p): n for n, p in model.named_parameters()}
        named_groups = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in groups]
        mesh = fsdp.init_process_group(device)
        runner = fsdp.shard(model, loss_fn, mesh, fsdp.resolve_param_dtype(config.fsdp_param_dtype, device))
        current = dict(model.named_parameters())
        groups = [{**g, "params": [current[n] for n in g["params"]]} for g in named_groups]
        local, total = fsdp.local_numel(model)
        log.info("%s: FSDP over %d ranks; rank %d holds %d of %d parameters", name, world, rank, local, total)
    optimizer = build_optimizer(groups, config)
    min_ratio = config.min_lr / config.lr if config.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(steps, config.warmup_ratio, min_ratio))
    params = [p for g in groups for p in g["params"]]
    masked = {n: m for n, m in (grad_masks or {}).items()}

    step = position = 0  # optimizer steps done; samples consumed (all ranks)
    per_step = config.batch_size * config.grad_accum * world
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        step, position = load_checkpoint(checkpoint, model, runner, optimizer, scheduler, sharded,
                                         config.batch_size * config.grad_accum, data, resume == DATA_CHANGED,
                                         weights)
        log.info("%s: resumed from %s at step %d (sample %d)", name, checkpoint, step, position)
        if config.max_steps <= 0 and position != step * per_step:
            # Resumed on another number of processes: the steps left are those the samples left need. The run had
            # read everything the epochs ask for before its last step: it would be shortened (refused below).
            needed = config.epochs * len(dataset)
            shortened = step > 0 and position - position // step >= needed
            steps = step - 1 if shortened else step + max(0, math.ceil((needed - position) / per_step))
            scheduler.lr_lambdas = [cosine_lambda(steps, config.warmup_ratio, min_ratio)] * len(optimizer.param_groups)
        # The restored lr is the old schedule's; a lengthened run's next step takes the new one (the same value when
        # the length is unchanged: LambdaLR computes it the same way).
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                          strict=True):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        if step > steps:
            raise ValueError(f"cannot resume {checkpoint} (step {step}) with {steps} steps in all: a resume can "
                             "lengthen a run, not shorten it (raise max_steps or epochs)")
        if step == steps:
            log.info("%s: the run is already at its last step (%d); nothing to train", name, step)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        # Both replaced whole (`replace_file`): a kill while they are rewritten on a resume must leave the run's
        # config and loss history as they were, not a torn file that loses the records and blocks the next resume.
        config_text = json.dumps(config.to_dict(), indent=2)
        replace_file(out / CONFIG_FILE, lambda target: target.write_text(config_text))
        # Drop records past the resumed step so the log reads as one uninterrupted run.
        kept = "".join(json.dumps(r) + "\n" for r in read_log(out) if r["step"] <= step)
        replace_file(out / LOG_FILE, lambda target: target.write_text(kept))

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
    )
    result = TrainResult()
    workers = config.num_workers if config.num_workers >= 0 else auto_workers(device, world)
    sampler = MicroBatchIndices(order, position, steps - step, config.batch_size, config.grad_accum, world, rank)
    # Closed on the way out, a stop or Ctrl+C included: the workers end with the loop, not with its traceback.
    with StepReader(dataset, collate, sampler, workers if step < steps else 0) as reader:
        started = time.perf_counter()
        while step < steps:
            sums: dict[str, float] = {}
            batches = reader.next_step()
            if _unread_anywhere(batches, sharded, device):
                # The other ranks cannot tell why (a sample or a killed data worker): its own error says, and how.
                stop = batches if isinstance(batches, Unreadable) else Unreadable(
                    "another process could not read its samples of this step (its own error says why)",
                    "continue with --resume once that is put right")
                _stop_unreadable(stop.message, step, position, model, optimizer, scheduler, out,
                                 runner if sharded else None, data, config.save_total_limit, stages, stop.way_out,
                                 weights)
            rng_before = trainer_state.rng_state()  # a diverged step is undone whole: the RNG it drew included
            for micro, batch in enumerate(batches):
                if sharded:
                    fsdp.set_gradient_sync(runner, micro == config.grad_accum - 1)
                with autocast:
                    terms = runner(fsdp.Opaque(batch)) if sharded else loss_fn(batch)
                (terms["loss"] / config.grad_accum).backward()
                for key, value in terms.items():
                    if torch.is_tensor(value) and value.ndim == 0:
                        sums[key] = sums.get(key, 0.0) + float(value.detach()) / config.grad_accum
            if sharded:
                sums = _mean_over_ranks(sums, world, device)
                fsdp.drop_unused_gradients(runner)
            current = dict(model.named_parameters())
            for key, mask in masked.items():
                fsdp.mask_gradient(current[key], mask)
            with_grad = [p for p in params if p.grad is not None]
            if config.grad_clip > 0:
                grad_norm = fsdp.as_float(torch.nn.utils.clip_grad_norm_(with_grad, config.grad_clip))
            else:
                grad_norm = fsdp.as_float(torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
            lr = optimizer.param_groups[0]["lr"]
            if not (math.isfinite(sums.get("loss", 0.0)) and math.isfinite(grad_norm)):
                # The same numbers on every rank (means over ranks, the global norm): every rank stops here together.
                optimizer.zero_grad(set_to_none=True)
                trainer_state.set_rng_state(rng_before)
                reason = (f"the loss is {sums.get('loss')} and the gradient norm {grad_norm}: the run diverged (a "
                          "learning rate too high, float16 overflow) and this step would write non-finite weights")
                _stop_unreadable(reason, step, position, model, optimizer, scheduler, out, runner if sharded else None,
                                 data, config.save_total_limit, stages, "lower lr in a new run (another --out), or fix "
                                 "the data and continue with --resume", weights)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += per_step

            record = {"step": step, "lr": lr, **sums, "grad_norm": grad_norm,
                      "time": round(time.perf_counter() - started, 3)}
            result.records.append(record)
            if main_process and (step % max(1, config.log_every) == 0 or step == steps):
                with (out / LOG_FILE).open("a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("%s step %d/%d loss %.5f", name, step, steps, sums.get("loss", float("nan")))
            if (config.save_every > 0 and step % config.save_every == 0) or step == steps:
                folder = out / CHECKPOINT_DIR / f"step-{step:07d}"
                save_checkpoint(model, optimizer, scheduler, step, folder, runner if sharded else None, position, data,
                                stages, weights)
                if main_process:
                    # After save_checkpoint's last barrier: every rank's part of the new checkpoint is written.
                    remove_old_checkpoints(out, config.save_total_limit)
                    plot_losses(read_log(out), out / PLOT_FILE, name)
    state = fsdp.gathered_state(runner) if sharded else None
    if main_process:
        result.final_dir = (finalize or _finalize_full(model, config, step, stages))(out / FINAL_DIR, state)
    result.runner = runner
    if sharded:
        dist.barrier()
    result.last_step = step
    return result


def _unread_anywhere(batches: list[Any] | Unreadable, sharded: bool, device: torch.device) -> bool:
    """Whether this rank or (under torchrun) any rank could not read its samples: every rank then stops together,
    where a lone failing rank left the others waiting in the step's collectives."""
    failed = isinstance(batches, Unreadable)
    if not sharded:
        return failed
    flag = torch.tensor([float(failed)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _stop_unreadable(reason: str, step: int, position: int, model: nn.Module, optimizer, scheduler,
                     out: Path, root: nn.Module | None, data: DataIdentity, keep: int, stages: Sequence[str],
                     way_out: str, weights: CheckpointWeights | None = None) -> None:
    """Stop on a step that cannot be read (a sample, a worker that ended) or that diverged, after saving the steps
    trained since the last checkpoint (collective under torchrun), so nothing trained is lost; `keep`: the run's
    save_total_limit, `way_out`: what the error tells the user to do with the saved state."""
    saved = ""
    if step > 0:
        folder = out / CHECKPOINT_DIR / f"step-{step:07d}"
        if not is_complete_checkpoint(folder):  # not saved yet
            save_checkpoint(model, optimizer, scheduler, step, folder, root, position, data, stages, weights)
            if root is None or dist.get_rank() == 0:
                remove_old_checkpoints(out, keep)  # after save_checkpoint's last barrier, as in the loop
        saved = f"; the run's state after step {step} is saved in {folder}: {way_out}"
    raise ValueError(f"step {step + 1}: {reason}{saved}")


def _finalize_full(model: nn.Module, config: TrainConfig, step: int, stages: Sequence[str]) -> Finalize:
    """The default `final/`: our format with `TRAINED_BY_FILE`, and with `export_official` also the release layout
    in `final_official/`."""

    def write(folder: Path, state: dict[str, torch.Tensor] | None) -> Path:
        full = model.state_dict() if state is None else state
        save_pretrained(model, folder, state=full)
        write_trained_by(folder, stages[-1], step, stages)
        if config.export_official:
            from medsight.train.export import export_official

            write_trained_by(export_official(model.config, model.tokenizer, full, folder.parent / OFFICIAL_DIR, step),
                             stages[-1], step, stages)
        return folder

    return write


def write_trained_by(folder: Path, stage: str, steps: int, stages: Sequence[str] | None = None, **extra: Any) -> None:
    """`TRAINED_BY_FILE` in a model folder a run writes (final/, final_official/, each step checkpoint, a merged
    model): which stage trained it last and `stages`, the runs it went through oldest first (`run_stages`; [stage]
    if not given), read by the start checks (`medsight.train.cli.check_stage_order`, `check_code_rows`). Atomic, as
    the trainer state files."""
    history = list(stages) if stages else [stage]
    trainer_state.write_json(folder / TRAINED_BY_FILE, {"stage": stage, "steps": steps, "stages": history, **extra})


def read_trained_by(folder: Path) -> dict[str, Any]:
    """A model folder's `TRAINED_BY_FILE` ({} without one: a preset, a release, a folder from before the record)."""
    path = folder / TRAINED_BY_FILE
    record = read_user_json(path, "trained-by record") if path.is_file() else {}
    return record if isinstance(record, dict) else {}


def recorded_stages(record: dict[str, Any]) -> list[str]:
    """The runs a `TRAINED_BY_FILE` record says its model went through, oldest first: its "stages", or for a record
    written before they were kept, its last "stage" alone; [] for none."""
    stages = record.get("stages")
    if isinstance(stages, list) and stages and all(isinstance(s, str) for s in stages):
        return stages
    stage = record.get("stage")
    return [stage] if isinstance(stage, str) else []


def run_stages(init_from: str, name: str) -> list[str]:
    """The runs the model a run named `name` writes has gone through: those its start records (none for a random
    preset or a folder without a record), then this run (once, where it trains on its own stage's output)."""
    if loading.is_random_preset(init_from):
        before: list[str] = []
    else:
        before = recorded_stages(read_trained_by(Path(loading.embedded_folder(init_from) or init_from)))
    return before if before[-1:] == [name] else [*before, name]


def _param_groups(params: Sequence[Any]) -> list[dict[str, Any]]:
    """Param groups of the trainable parameters (a plain list becomes one group)."""
    is_groups = bool(params) and isinstance(params[0], dict)
    groups = [dict(g) for g in params] if is_groups else [{"params": list(params)}]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    return [g for g in groups if g["params"]]


def _mean_over_ranks(sums: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The logged terms of a sharded step: the mean over ranks, i.e. over the global batch."""
    keys = sorted(sums)
    # On the training device: NCCL (the backend on GPUs) reduces only CUDA tensors ("No backend type associated
    # with device type cpu" for a CPU one).
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(keys, values, strict=True)}


def save_checkpoint(model: nn.Module, optimizer, scheduler, step: int, folder: Path,
                    root: nn.Module | None = None, samples: int | None = None,
                    data: DataIdentity | None = None, stages: Sequence[str] | None = None,
                    weights: CheckpointWeights | None = None) -> Path:
    """Everything the loop needs to continue exactly.

    Single process: the model in our format, and `trainer_state.pt` (optimizer tensors, scheduler, step, RNG; read
    back with weights_only=True). Sharded (`root` given; collective): DCP shards of model and optimizer,
    `trainer_state.json` (step, scheduler, optimizer groups) and `rng-rank{r}.json` per rank. `samples`: how many
    the run has consumed (its data position); `data`: its data set's size and content (`check_data`); `stages`: the
    runs the model went through, this one last (`run_stages`), recorded as `write_trained_by` (a single-process
    checkpoint of a whole model is a folder an init_from can name, a LoRA run's an adapter --adapter takes);
    `weights`: what a checkpoint holds of the model instead (a LoRA run: its adapter; sharded, beside the DCP shards
    of its trained tensors alone).
    """
    counts = {**({} if samples is None else {"samples": samples}), **({} if data is None else data.fields())}
    if root is None:
        if weights is None:
            save_pretrained(model, folder)
        else:
            weights.save(folder, None)
        if stages:
            write_trained_by(folder, stages[-1], step, stages)
        sync_tree(folder)  # the weights reach the disk before the state file marks the checkpoint complete
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": trainer_state.rng_state(), **counts}
        trainer_state.save_tensors(folder / STATE_FILE, state)
        return folder
    rank = dist.get_rank()
    groups = fsdp.save_sharded(folder, root, optimizer, trained_only=weights is not None)
    trainer_state.write_json(folder / f"rng-rank{rank}.json", trainer_state.rng_state())
    trained = None if weights is None else fsdp.gathered_trained(root)  # collective
    dist.barrier()
    if rank == 0:
        if trained is not None:
            weights.save(folder, trained)
        if stages:
            write_trained_by(folder, stages[-1], step, stages)
        if trained is not None:  # the adapter is written in place (DCP flushes its own shards)
            sync_tree(folder)  # on disk before the state file marks the checkpoint complete, as in one process
        plain = {"step": step, "scheduler": scheduler.state_dict(), "param_groups": groups,
                 "world_size": dist.get_world_size(), **counts}
        # Written last: its presence marks the checkpoint complete (`latest_checkpoint`).
        trainer_state.write_json(folder / SHARDED_STATE_FILE, plain)
    dist.barrier()
    return folder


#: `resume=DATA_CHANGED` (`medsight train --resume --data-changed`): continue although the data's content differs
#: from the run's, for a deliberate edit (corrected answers or labels, a data set moved with absolute paths in it).
DATA_CHANGED = "data-changed"


@dataclass(frozen=True)
class DataIdentity:
    """What a checkpoint records of its run's training data: the number of samples (the sample order is a
    permutation of it) and, for the JSON data sets (`medsight.train.data`), the fingerprint of their content and the
    file it came from. Data sets of another kind (a list handed in code) have only their size."""

    size: int
    fingerprint: str | None = None
    source: str | None = None

    @classmethod
    def of(cls, dataset: Sequence[Any]) -> DataIdentity:
        return cls(len(dataset), getattr(dataset, "fingerprint", None), getattr(dataset, "source", None))

    def fields(self) -> dict[str, Any]:
        recorded = {"data_size": self.size, "data_fingerprint": self.fingerprint, "data_source": self.source}
        return {k: v for k, v in recorded.items() if v is not None}


def check_data(folder: Path, saved: dict[str, Any], current: DataIdentity | None, changed_ok: bool = False) -> None:
    """A resume reads the run's data set. Data of another size (another --data file, items added or removed) would
    silently train on another stream of samples; data of the same size but other content (another file, edited
    items) would continue the run on samples it never started with. Both are refused; the content check is waived
    by `changed_ok` (DATA_CHANGED), for an edit made on purpose. Checkpoints that predate a record are not checked."""
    size = saved.get("data_size")
    if current is None:
        return
    if size is not None and int(size) != current.size:
        raise ValueError(f"cannot resume {folder}: the run's training data held {int(size)} samples, --data now holds "
                         f"{current.size}; resume with the run's data, or start a new run in another --out folder")
    fingerprint = saved.get("data_fingerprint")
    if fingerprint is None or current.fingerprint is None or fingerprint == current.fingerprint:
        return
    run = f"{saved.get('data_source', 'its data')} (content sha256 {fingerprint[:12]})"
    now = f"{current.source or '--data'} (content sha256 {current.fingerprint[:12]})"
    if changed_ok:
        log.warning("resuming %s on changed data (--data-changed): the run trained on %s, --data now is %s",
                    folder, run, now)
        return
    raise ValueError(f"cannot resume {folder}: the run trained on {run}, --data now is {now}: the same number of "
                     "samples, other content. Resume with the run's data, start a new run in another --out folder, or "
                     "pass --data-changed to continue on the edited data (same items in the same order)")


def load_checkpoint(folder: Path, model: nn.Module, root: nn.Module, optimizer, scheduler, sharded: bool,
                    samples_per_rank_step: int, data: DataIdentity | None = None,
                    data_changed_ok: bool = False, weights: CheckpointWeights | None = None) -> tuple[int, int]:
    """Restore what `save_checkpoint` wrote; returns (step, samples consumed). A sharded checkpoint continues in one
    process too; a single-process one under torchrun is an error, and so is one of a data set other than `data`
    (`check_data`; `data_changed_ok` waives the content).
    `samples_per_rank_step` (batch x grad-accum) dates a checkpoint that did not record its samples; `weights`: what
    `save_checkpoint` was given (a checkpoint written before a run saved only its trained tensors is read whole)."""
    is_sharded = (folder / SHARDED_STATE_FILE).is_file()
    if sharded and not is_sharded:
        raise CheckpointError(f"{folder} was written by a single-process run; resume it without torchrun (or with "
                              "torchrun --nproc-per-node 1)")
    if not is_sharded:
        # Weights first (strict: the model must be the same architecture), then the trainer state.
        if weights is not None and weights.is_saved(folder):
            weights.load(folder)
        else:
            load_into(model, read_safetensors_folder(folder), str(folder))
        state = trainer_state.load_tensors(folder / STATE_FILE)
        check_data(folder, state, data, data_changed_ok)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        trainer_state.set_rng_state(state["rng"])
        return int(state["step"]), int(state.get("samples", int(state["step"]) * samples_per_rank_step))
    plain = trainer_state.read_json(folder / SHARDED_STATE_FILE)
    check_data(folder, plain, data, data_changed_ok)
    trained_only = weights is not None and weights.is_saved(folder)
    if trained_only:
        weights.check(folder)
    if sharded:
        fsdp.load_sharded(folder, root, optimizer, plain["param_groups"], trained_only)
    else:  # a torchrun run continued in one process (one GPU left): its position says which samples come next
        fsdp.load_sharded_into_one(folder, model, optimizer, plain["param_groups"], trained_only)
    scheduler.load_state_dict(plain["scheduler"])
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    rng_file = folder / f"rng-rank{rank}.json"
    if rng_file.is_file():  # a different world size has no RNG for the new ranks: they keep the seeded one
        trainer_state.set_rng_state(trainer_state.read_json(rng_file))
    done = int(plain["step"]) * samples_per_rank_step * int(plain.get("world_size", world))
    return int(plain["step"]), int(plain.get("samples", done))
