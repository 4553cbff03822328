"""This process's micro-batches of each training step, read in the main process or in DataLoader worker processes.

The sample order stays the loop's (`medsight.train.loop.SampleOrder`: a pure function of seed and position), worked
out in the main process: a sampler hands each micro-batch's sample indices to the workers, and the DataLoader gives
the batches back in that order, so any number of workers reads exactly the batches of the main-process read, a
resume included (the sampler starts at the checkpoint's position).

Workers are forked from a fork server (started once per process, spawn where there is none: Windows), which has
imported the reading code (`PRELOAD`) and holds nothing of the trainer: each worker receives only the pickled
`BatchReader` (the data set, with its tokenizer, and the collate function). Forked from the trainer, as the
DataLoader's Linux default does, a worker keeps the pages of the model and optimizer as they were at the fork alive
for as long as it runs (a whole model's copy on a CPU run), and forking after torch and gloo have started threads
can deadlock; spawned, each worker imports torch and transformers itself (about 1 GB and 20 s each on a 2-core
machine). A sample that cannot be read is returned as its one-line message (`Unreadable`), never raised in the
worker, whose exception would arrive as a worker traceback. A worker killed from outside (the out-of-memory killer)
ends the step's read the same way, with a message naming it (`StepReader.next_step`), where the DataLoader raised
"DataLoader worker (pid(s) ...) exited unexpectedly" with a traceback and the run lost its steps since the last
checkpoint.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

#: Workers at most when `num_workers` is automatic (the official LLaVA scripts' --dataloader_num_workers).
AUTO_MAX_WORKERS = 4
#: Seconds a failed read waits for a worker's end to be reported before the error is taken for another one (the
#: DataLoader's own check of its workers runs every 5 s).
LOST_WORKER_WAIT_S = 5.0
#: What the fork server imports before it forks workers: the readers' code (torch, transformers' tokenizers).
PRELOAD = ["medsight.train.data"]


@dataclass(frozen=True)
class Unreadable:
    """A step whose micro-batches could not be read: the data set's error text (which names the file), or what
    ended a worker; `way_out`: what to do once the trainer has saved the steps before it."""

    message: str
    way_out: str = "replace the file and continue with --resume"


class BatchReader(torch.utils.data.Dataset):
    """What a worker holds: the data set and the collate function. Item = one micro-batch's sample indices."""

    def __init__(self, dataset: Sequence[Any], collate: Callable[[list[Any]], Any]) -> None:
        self.dataset, self.collate = dataset, collate

    def __getitem__(self, indices: list[int]) -> Any:
        try:
            return self.collate([self.dataset[i] for i in indices])
        except (ValueError, OSError) as err:  # an image damaged or replaced since the run started, named
            return Unreadable(str(err))


class MicroBatchIndices(Sampler):
    """This rank's sample indices per micro-batch, step after step, from `position` (samples consumed, all ranks) for
    `steps` steps: micro-batch `micro` of the step at position p reads the samples at p + (micro x world + rank) x
    batch_size onwards, as a DistributedSampler slices a global batch."""

    def __init__(self, order: Sequence[int], position: int, steps: int, batch_size: int, grad_accum: int,
                 world: int, rank: int) -> None:
        self.order, self.position, self.steps = order, position, steps
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank

    def __len__(self) -> int:
        return self.steps * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch_size * self.grad_accum * self.world
        for step in range(self.steps):
            start = self.position + step * per_step
            for micro in range(self.grad_accum):
                first = start + (micro * self.world + self.rank) * self.batch_size
                yield [self.order[first + i] for i in range(self.batch_size)]


def auto_workers(device: torch.device, world: int = 1) -> int:
    """Workers per process when the config leaves it automatic: none on the CPU (the step's own threads take every
    core, and a worker would compete with them), else the cores this process's share leaves after itself, at most
    `AUTO_MAX_WORKERS`."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(AUTO_MAX_WORKERS, cores // max(1, world) - 1))


def worker_context() -> multiprocessing.context.BaseContext:
    """How workers start: forked from the fork server, which preloads `PRELOAD` (set before it starts; without
    '__main__', the default, the server does not run the caller's script again), or spawned where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    return context


def _as_read(batch: Any) -> Any:
    """The DataLoader's collate_fn: `BatchReader` has collated already (module level: picklable for spawn)."""
    return batch


class StepReader:
    """Iterates this process's micro-batches, `grad_accum` per step (`next_step`); `close` ends the workers (also
    as a context manager), at once, where an interrupted loop's traceback would keep them alive."""

    def __init__(self, dataset: Sequence[Any], collate: Callable[[list[Any]], Any], sampler: MicroBatchIndices,
                 num_workers: int) -> None:
        self.grad_accum = sampler.grad_accum
        # A generator of its own: making the iterator draws the workers' base seed from it, which from torch's
        # global generator would shift the model's random stream away from a run without workers.
        loader = DataLoader(BatchReader(dataset, collate), batch_size=None, sampler=sampler, collate_fn=_as_read,
                            num_workers=num_workers, generator=torch.Generator(),
                            multiprocessing_context=worker_context() if num_workers > 0 else None)
        try:
            self._iterator: Iterator[Any] | None = iter(loader)
        except (pickle.PicklingError, AttributeError, TypeError) as err:  # each worker receives them pickled
            raise ValueError(f"num_workers {num_workers}: the data set or its collate function cannot be sent to a "
                             f"worker process ({err}); set num_workers to 0") from None

    def next_step(self) -> list[Any] | Unreadable:
        """The step's micro-batches, or why they cannot be read: the first unreadable sample (the batches after it
        are not waited for), or a worker that ended."""
        assert self._iterator is not None, "the reader is closed"
        batches = []
        for _ in range(self.grad_accum):
            try:
                batch = next(self._iterator)
            except Exception:  # re-raised unless a worker ended
                # A worker's end arrives as "DataLoader worker (pid(s) ...) exited unexpectedly", or, where a batch it
                # sent is taken after it ended, as the EOFError or ConnectionRefusedError of fetching its tensors.
                lost = self._lost_worker()
                if lost is None:
                    raise
                return lost
            if isinstance(batch, Unreadable):
                return batch
            batches.append(batch)
        return batches

    def _lost_worker(self) -> Unreadable | None:
        """What ended a worker, if one has ended (the DataLoader's own list of its worker processes)."""
        workers = list(getattr(self._iterator, "_workers", []))
        if not workers:
            return None
        # The fork server reports a worker's end a moment after its pipes close: wait for it, or for none.
        multiprocessing.connection.wait([w.sentinel for w in workers], timeout=LOST_WORKER_WAIT_S)
        ended = [w for w in workers if w.exitcode is not None]
        if not ended:
            return None
        code = ended[0].exitcode
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            how = f"was killed by {name}" + (", most likely by the out-of-memory killer" if name == "SIGKILL" else "")
        else:
            how = f"exited with code {code}"
        return Unreadable(f"a data-reading worker process (pid {ended[0].pid}, one of {len(workers)}) {how}",
                          "continue with --resume and fewer --num-workers (each worker holds its own samples "
                          "in memory; 0 reads them in the training process)")

    def close(self) -> None:
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # the DataLoader's own way to end its workers
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> StepReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
