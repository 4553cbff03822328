"""DataLoader workers (`num_workers`) read exactly the batches of the main-process read, resume included; a bad
sample a worker meets stops the run with the same one-line error; workers hold only the reader and end with the
loop. Sizes come from the synthetic fixture (`write_synthetic`)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config import tiny_config
from medsight.model.loading import build_model, load_pretrained
from medsight.train.cli import main as train_main
from medsight.train.data import (
    ConversationDataset,
    SegmentationDataset,
    collate_conversations,
    collate_segmentation,
)
from medsight.train.loop import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    LOG_FILE,
    SampleOrder,
    TrainConfig,
    is_complete_checkpoint,
    read_log,
)
from medsight.train.reading import MicroBatchIndices, StepReader, Unreadable
from medsight_testing.torchrun import torchrun
from medsight_testing.train_data import write_synthetic

WORKERS = 2
BATCH, ACCUM = 2, 2
READING_WORKER = Path(__file__).with_name("reading_worker.py")


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return write_synthetic(tmp_path / "data")


def _conversations(model, data: dict[str, Path], **kwargs) -> ConversationDataset:
    v = model.config.vision
    return ConversationDataset(data["lvlm"], model.tokenizer, v.image_size, v.image_mean, v.image_std,
                               data_root=data["root"], codes=model.codes, **kwargs)


def _segmentation(model, data: dict[str, Path]) -> SegmentationDataset:
    v = model.config.vision
    return SegmentationDataset(data["meta"], v.image_size, v.image_mean, v.image_std)


def _read(dataset, collate, workers: int, position: int = 0, steps: int | None = None, world: int = 1,
          rank: int = 0) -> list:
    """Every step's micro-batches from `position` (default: two epochs and a bit, so an epoch end is crossed)."""
    per_step = BATCH * ACCUM * world
    steps = steps if steps is not None else math.ceil((2 * len(dataset) + 1) / per_step) - position // per_step
    sampler = MicroBatchIndices(SampleOrder(len(dataset), 7), position, steps, BATCH, ACCUM, world, rank)
    with StepReader(dataset, collate, sampler, workers) as reader:
        return [reader.next_step() for _ in range(steps)]


def _flat(batch) -> list[torch.Tensor]:
    """A micro-batch's contents as tensors, in order (ids, labels, pixels, masks; or pixels, masks, classes,
    modalities)."""
    if isinstance(batch, list):
        return [t for s in batch for t in (torch.tensor(s.input_ids), torch.tensor(s.labels), s.pixels,
                                           torch.zeros(0) if s.masks is None else s.masks)]
    return [batch.pixels, *batch.masks, *batch.classes, torch.tensor(batch.modalities)]


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for step_got, step_want in zip(got, want, strict=True):
        assert len(step_got) == len(step_want) == ACCUM
        for a, b in zip(step_got, step_want, strict=True):
            flat_a, flat_b = _flat(a), _flat(b)
            assert len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


@pytest.mark.parametrize("kind", ["conversations", "segmentation"])
def test_workers_read_the_batches_of_the_main_process_in_its_order_resume_included(model, data, kind):
    """Two epochs of steps (batch 2 x grad-accum 2) with 2 workers: every id, label, pixel and mask tensor equals the
    main-process read's, step by step; a read resumed at step k gives the uninterrupted read's steps after k; the two
    ranks of a 2-process run read the halves of each micro-batch slot of the 1-process global batch."""
    dataset, collate = ((_conversations(model, data), collate_conversations) if kind == "conversations"
                        else (_segmentation(model, data), collate_segmentation))
    main = _read(dataset, collate, 0)
    assert len(main) * BATCH * ACCUM > len(dataset)
    _assert_same(_read(dataset, collate, WORKERS), main)
    k = len(main) // 2
    _assert_same(_read(dataset, collate, WORKERS, position=k * BATCH * ACCUM), main[k:])
    # Two ranks of batch 1: rank r's micro-batch m of a step is the 1-process step's samples at (m x 2 + r).
    order = SampleOrder(len(dataset), 7)
    per_rank = [MicroBatchIndices(order, 0, 3, 1, ACCUM, 2, r) for r in range(2)]
    single = list(MicroBatchIndices(order, 0, 3, 2, ACCUM, 1, 0))
    assert [a + b for a, b in zip(*per_rank, strict=True)] == single


def _bad_item(model, data: dict[str, Path], kind: str) -> tuple[ConversationDataset, int, str]:
    """The conversation data with one item made bad after the start checks; its index and the message pattern."""
    dataset = _conversations(model, data)
    coded = next(i for i, item in enumerate(dataset.items) if item["mask_orders"])
    item = dataset.items[coded]
    image, mask = dataset.resolve(item["image"]), dataset.resolve(item["mask_files"][item["mask_orders"][0]])
    if kind == "16-bit image that clips":
        Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(image)
        pattern = rf"cannot use the image {image}: its pixels are I;16 \(more than 8 bits"
    elif kind == "0/1 mask":
        Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8)).save(mask)
        pattern = rf"the mask {mask} has pixels set but none above half scale"
    elif kind == "other aspect":
        full = np.asarray(Image.open(mask))
        Image.fromarray(full[:, : full.shape[1] // 2]).save(mask)
        pattern = rf"the mask {mask} is .* another aspect ratio"
    else:  # too long
        dataset.max_length = dataset.length(item) - 1
        pattern = rf"{dataset.max_length + 1} embeddings long, more than the model's {dataset.max_length}"
    return dataset, coded, rf"train\.json: item {coded} \(id {item['id']!r}\): {pattern}"


@pytest.mark.parametrize("kind", ["16-bit image that clips", "0/1 mask", "other aspect", "too long"])
def test_a_bad_sample_read_by_a_worker_gives_the_main_process_error(model, data, kind):
    """The content checks a sample meets when read (a >8-bit image that would clip, a 0/1 mask, a mask of another
    aspect ratio, a conversation longer than the model takes) give a worker's read the same one-line message naming
    item and file, at the same step, as the main process's: not a worker's traceback."""
    dataset, _, pattern = _bad_item(model, data, kind)
    steps = _read(dataset, collate_conversations, 0)
    failing = next(s for s, step in enumerate(steps) if isinstance(step, Unreadable))
    message = steps[failing].message
    assert re.search(pattern, message), message
    read_by_workers = _read(dataset, collate_conversations, WORKERS)
    assert read_by_workers[failing] == steps[failing]
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert all(not isinstance(step, Unreadable) for step in read_by_workers[:failing])


def test_making_the_reader_leaves_the_models_random_stream_alone(model, data):
    """A DataLoader iterator draws its workers' base seed from torch's global generator unless given its own: with
    workers the model's random stream (dropout, a random init on the way) would differ from a run without."""
    dataset = _segmentation(model, data)
    for workers in (0, WORKERS):
        before = torch.get_rng_state()
        _read(dataset, collate_segmentation, workers, steps=1)
        assert torch.equal(torch.get_rng_state(), before)


def _memory_mib(pid: int | str) -> int:
    """Anonymous resident memory (heap: tensors, Python objects) of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) // 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_workers_hold_the_reader_not_the_trainers_memory(model, data):
    """A worker forked from the trainer (the DataLoader's Linux default) keeps every page the trainer held at the fork
    (a model's weights and optimizer on a CPU run: measured 2.6 GB RssAnon for a worker of a process holding a 2 GiB
    tensor, 1.6 GB for 1 GiB). Started from the fork server, a worker holds the reading code and the reader: less
    than that tensor."""
    held = torch.ones(2**28)  # 1 GiB, resident: the trainer's model and optimizer
    held_mib = held.numel() * held.element_size() // 2**20
    dataset = _segmentation(model, data)
    sampler = MicroBatchIndices(SampleOrder(len(dataset), 7), 0, 1, 1, 1, 1, 0)
    with StepReader(dataset, collate_segmentation, sampler, 1) as reader:
        reader.next_step()
        workers = multiprocessing.active_children()
        memory = [_memory_mib(w.pid) for w in workers]
    assert len(memory) == 1 and memory[0] < held_mib < _memory_mib("self"), (memory, held_mib)
    assert not multiprocessing.active_children()  # closed: the worker ended with the reader


def test_a_run_with_workers_trains_stops_and_resumes_as_one_without(tmp_path):
    """stage 3 with 2 workers: an image damaged mid-run stops it at the same step with the main-process read's one-line
    error (item and file; `_bad_item` compares the messages), saves the steps before, leaves no worker running;
    resumed with workers once the file is whole, its losses and final weights equal an uninterrupted run without
    workers, exactly."""
    data = write_synthetic(tmp_path / "data")
    items = json.loads(data["lvlm"].read_text())
    steps, failing = 3, 2
    (tmp_path / "cfg.json").write_text(json.dumps({"init_from": "tiny", "max_steps": steps, "grad_accum": 1}))
    index = SampleOrder(len(items), TrainConfig.seed)[failing - 1]  # batch 1 x grad_accum 1: one sample a step
    image = data["root"] / items[index]["image"]

    def run(out: str, *extra: str) -> int:
        return train_main(["stage3", "--config", str(tmp_path / "cfg.json"), "--data", str(data["lvlm"]), "--out",
                           str(tmp_path / out), *extra])

    assert run("whole", "--num-workers", "0") == 0
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as raised:
        run("broken", "--num-workers", str(WORKERS))
    error = str(raised.value)
    kept = tmp_path / "broken" / CHECKPOINT_DIR / f"step-{failing - 1:07d}"
    assert error.startswith(f"step {failing}: {data['lvlm']}: item {index} (id {items[index]['id']!r}): cannot read "
                            f"the image {image}: ") and f"is saved in {kept}" in error and "\n" not in error, error
    assert not multiprocessing.active_children()
    image.write_bytes(whole)
    assert run("broken", "--resume", "--num-workers", str(WORKERS)) == 0
    losses = [[r["loss"] for r in read_log(tmp_path / out)] for out in ("whole", "broken")]
    assert losses[0] == losses[1] and len(losses[0]) == steps
    want, got = (load_pretrained(tmp_path / out / FINAL_DIR).state_dict() for out in ("whole", "broken"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_worker_killed_from_outside_stops_the_run_with_its_steps_saved_and_the_resume_is_exact(tmp_path):
    """A worker killed by SIGKILL (as the out-of-memory killer kills) mid-run ended it with the DataLoader's
    RuntimeError traceback ("DataLoader worker (pid(s) ...) exited unexpectedly"; EOFError where a batch it had sent
    was taken after), losing every step since the last checkpoint (none here: save_every 0). Now one line names the
    worker and the signal, the steps done are saved as a checkpoint, and resumed with fewer workers the run's losses
    and final weights equal an uninterrupted run without workers, exactly."""
    data = write_synthetic(tmp_path / "data")
    steps = 8  # more than the 2 workers x 2 batches read ahead: the killed worker still has samples to read
    (tmp_path / "cfg.json").write_text(json.dumps({"init_from": "tiny", "max_steps": steps, "grad_accum": 1}))

    def run(out: str, *extra: str) -> int:
        return train_main(["stage3", "--config", str(tmp_path / "cfg.json"), "--data", str(data["lvlm"]), "--out",
                           str(tmp_path / out), *extra])

    assert run("whole", "--num-workers", "0") == 0
    killed: list[int] = []

    def kill_a_worker_after_the_first_step() -> None:
        log = tmp_path / "killed" / LOG_FILE
        while not (log.is_file() and log.read_text().strip()):
            time.sleep(0.005)
        killed.append(multiprocessing.active_children()[0].pid)
        os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_the_first_step, daemon=True)
    killer.start()
    with pytest.raises(ValueError) as raised:
        run("killed", "--num-workers", str(WORKERS))
    killer.join(timeout=1)
    done = len(read_log(tmp_path / "killed"))
    kept = tmp_path / "killed" / CHECKPOINT_DIR / f"step-{done:07d}"
    assert str(raised.value) == (
        f"step {done + 1}: a data-reading worker process (pid {killed[0]}, one of {WORKERS}) was killed by SIGKILL, "
        f"most likely by the out-of-memory killer; the run's state after step {done} is saved in {kept}: continue "
        "with --resume and fewer --num-workers (each worker holds its own samples in memory; 0 reads them in the "
        "training process)")
    assert 1 <= done < steps and is_complete_checkpoint(kept) and not multiprocessing.active_children()
    assert run("killed", "--resume", "--num-workers", str(WORKERS - 1)) == 0
    losses = [[r["loss"] for r in read_log(tmp_path / out)] for out in ("whole", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == steps
    want, got = (load_pretrained(tmp_path / out / FINAL_DIR).state_dict() for out in ("whole", "killed"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_each_torchrun_rank_reads_with_workers_what_it_reads_without(model, tmp_path):
    """Under torchrun (2 gloo ranks) each rank's workers read that rank's micro-batches of the main-process read,
    tensor for tensor, over more than an epoch; rank r's samples are the global order's (micro x 2 + r)-th."""
    data = write_synthetic(tmp_path / "data")
    dataset = _conversations(model, data)
    world, steps = 2, math.ceil(len(dataset) / (2 * 1 * 2)) + 1  # batch 1 x grad_accum 2 x 2 ranks
    torchrun(world, [str(READING_WORKER), str(data["lvlm"]), str(tmp_path), str(steps)])
    order = SampleOrder(len(dataset), TrainConfig.seed)
    for rank in range(world):
        read = [torch.load(tmp_path / f"rank{rank}-workers{n}.pt", weights_only=True) for n in (0, WORKERS)]
        assert len(read[0]) == len(read[1]) == steps
        for step in range(steps):
            for micro in range(2):
                (want,), (got,) = read[0][step][micro], read[1][step][micro]
                sample = dataset[order[step * 4 + micro * world + rank]]
                assert got[0] == want[0] == sample.input_ids and got[1] == want[1] == sample.labels
                assert torch.equal(got[2], want[2]) and torch.equal(got[2], sample.pixels)
                assert (got[3] is None) == (want[3] is None) and (got[3] is None or torch.equal(got[3], want[3]))
