"""Encoder replicas: several encoder processes sharing the cores of a CPU box.

One process running the encoder on every core loses throughput twice: its
intra-op threads wait for each other at every layer, and while it reads and
resamples the next batch of tiles the other cores spin idle. ``R`` processes
with ``cores / R`` threads each keep the cores busy: every replica reads its
own tiles and runs its own copy of the encoder; the parent only writes the
cache, in order, so resume and completion work as in one process. Measured
on 2 cores with EfficientNet-Lite0 (``python -m virtualst.bench.embed_throughput``):
see README "Performance".

Each replica loads the encoder, so memory holds ``R`` copies of the
weights; :func:`plan_replicas` caps ``R`` to fit. Single-threaded replicas
are forked on Linux; others start from a fork server (see :func:`_context`).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from virtualst.errors import EncoderError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from virtualst.embed.encoders import EncoderIdentity
    from virtualst.embed.runner import EmbedSettings

#: Most replicas chosen automatically; beyond this, threads per replica grow instead.
MAX_AUTO_REPLICAS = 4
#: Fewer tiles than this are not worth starting replicas for (each loads the encoder).
MIN_TILES_FOR_REPLICAS = 1024
#: Share of physical memory the replicas' weights may take when chosen automatically.
WEIGHT_MEMORY_SHARE = 0.25
#: Batches per task: consecutive batches of one sample, so a replica decodes a JPEG
#: once for several batches, yet small enough that no replica idles long at the end.
CHUNK_BATCHES = 2
#: Chunks sent to each replica ahead of its results.
IN_FLIGHT = 2


@dataclass(frozen=True)
class ReplicaPlan:
    """How many encoder processes to run and how many threads each uses."""

    replicas: int
    threads: int


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what each replica holds a copy of)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def physical_memory_bytes() -> int | None:
    """Total RAM, or ``None`` where ``sysconf`` cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def plan_replicas(
    device: torch.device,
    n_tiles: int,
    encoder_bytes: int,
    requested: int | None = None,
    cores: int | None = None,
    memory_bytes: int | None = None,
) -> ReplicaPlan:
    """Replicas and threads each for embedding ``n_tiles`` tiles.

    Parameters
    ----------
    device
        Replicas are for CPU runs; any other device gets one process.
    n_tiles
        Tiles to embed; short runs are not worth the replicas' start-up.
    encoder_bytes
        Size of the encoder's weights (each replica holds a copy).
    requested
        ``EmbedSettings.cpu_replicas``: ``None`` chooses, a number is obeyed
        (capped at the number of cores).
    cores, memory_bytes
        The machine (default: this one).
    """
    cores = cores or os.cpu_count() or 1
    if device.type != "cpu":
        return ReplicaPlan(1, cores)
    if requested is not None:
        replicas = max(1, min(int(requested), cores))
    elif n_tiles < MIN_TILES_FOR_REPLICAS:
        replicas = 1
    else:
        replicas = min(cores, MAX_AUTO_REPLICAS)
        memory_bytes = memory_bytes if memory_bytes is not None else physical_memory_bytes()
        if memory_bytes and encoder_bytes:
            replicas = max(1, min(replicas, int(WEIGHT_MEMORY_SHARE * memory_bytes // encoder_bytes)))
    return ReplicaPlan(replicas, max(1, cores // replicas))


def chunk_items(dataset: Any, size: int = CHUNK_BATCHES) -> dict[int, deque[list[int]]]:
    """Group a :class:`~virtualst.embed.loader.TileBatches`'s items by job, in runs of at most ``size`` batches."""
    chunks: dict[int, deque[list[int]]] = {}
    for index, (job, _) in enumerate(dataset.items):
        runs = chunks.setdefault(job, deque())
        if runs and len(runs[-1]) < size:
            runs[-1].append(index)
        else:
            runs.append([index])
    return chunks


class ChunkQueue:
    """Hands out chunks so that each replica stays on one sample as long as it can.

    A replica first continues its own sample, then starts the next untouched
    one, and only then helps with the sample that has most chunks left: a
    JPEG is decoded by as few replicas as possible, and no replica idles
    while work remains.
    """

    def __init__(self, chunks: dict[int, deque[list[int]]]) -> None:
        self.chunks = chunks
        self.untouched = list(chunks)

    def __bool__(self) -> bool:
        return any(self.chunks.values())

    def take(self, current: int | None) -> tuple[int, list[int]] | None:
        """Next ``(job, chunk)`` for a replica whose last chunk was of job ``current``."""
        if current is None or not self.chunks.get(current):
            if self.untouched:
                current = self.untouched.pop(0)
            elif self:
                current = max(self.chunks, key=lambda job: len(self.chunks[job]))
            else:
                return None
        return current, self.chunks[current].popleft()


class InOrder:
    """Releases each job's batches in row order, whatever order replicas finish them.

    Batches of a job that become due together are released as one block
    (one cache write instead of several).
    """

    def __init__(self, first_rows: dict[int, int]) -> None:
        """``first_rows``: each job's first row to write."""
        self.next_row = dict(first_rows)
        self.waiting: dict[int, dict[int, np.ndarray]] = {job: {} for job in first_rows}

    def add(self, results: list[tuple[int, int, np.ndarray]]) -> Iterator[tuple[int, int, np.ndarray]]:
        """Take a chunk's ``(job, first_row, features)`` and yield each job's rows now due, as one block."""
        for job, first, features in results:
            self.waiting[job][first] = features
        for job in dict.fromkeys(job for job, _, _ in results):
            waiting, first = self.waiting[job], self.next_row[job]
            due = []
            while self.next_row[job] in waiting:
                due.append(waiting.pop(self.next_row[job]))
                self.next_row[job] += len(due[-1])
            if due:
                yield job, first, due[0] if len(due) == 1 else np.concatenate(due)


# ----------------------------------------------------------------- inside a replica
_replica: dict[str, Any] = {}


def _start_replica(settings: EmbedSettings, threads: int) -> None:
    """Executor initializer: set the threads and load the encoder once."""
    import torch

    from virtualst.embed.runner import make_extractor

    torch.set_num_threads(threads)
    _replica["extractor"] = make_extractor(settings)


def _identity() -> EncoderIdentity:
    from virtualst.embed.encoders import EncoderIdentity

    encoder = _replica["extractor"].encoder
    return EncoderIdentity(encoder.config, encoder.provenance)


def _encode_chunk(payload: bytes | None, indices: list[int]) -> list[tuple[int, int, np.ndarray]]:
    """Encode items of a dataset; the dataset comes (pickled) with a replica's first chunk of a run."""
    import torch

    if payload is not None:
        _replica.pop("dataset", None)  # releases the previous run's open image
        _replica["dataset"] = pickle.loads(payload)
    dataset, extractor = _replica["dataset"], _replica["extractor"]
    out = []
    for index in indices:
        job, first, tiles = dataset[index]
        out.append((job, first, extractor(torch.from_numpy(np.ascontiguousarray(tiles)))))
    return out


# ----------------------------------------------------------------------- the parent
def _context(threads: int):
    """Fork single-threaded replicas on Linux (fast, no re-import of a script's main
    module); otherwise a fork server: GNU OpenMP hangs in a forked child that
    runs parallel regions after its parent did, and macOS frameworks do not
    survive a fork."""
    methods = multiprocessing.get_all_start_methods()
    if threads == 1 and sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class EncoderReplicas:
    """A pool of CPU encoder processes that turns batches of tiles into features, in order.

    Stands in for a :class:`~virtualst.embed.extractor.FeatureExtractor` in
    :func:`~virtualst.embed.runner.embed_with`: it has ``encoder`` (the
    encoder's identity, for cache provenance) and ``device``. Use as a
    context manager, or call :meth:`close`. Replicas with several threads
    start from a fork server, which re-imports a script's main module: call
    from under ``if __name__ == "__main__":`` (the CLI does).

    Parameters
    ----------
    settings
        The run's settings (encoder, weights, TTA); replicas run on CPU.
    plan
        Replicas and threads per replica.

    Raises
    ------
    EncoderError
        When a replica dies (killed, out of memory, or failed to start).
    """

    def __init__(self, settings: EmbedSettings, plan: ReplicaPlan) -> None:
        import torch

        self.plan = plan
        self.device = torch.device("cpu")
        self.name = settings.encoder
        settings = replace(settings, device="cpu")
        context = _context(plan.threads)
        # One single-process executor per replica, so chunks can be routed to the replica that has their image open.
        self._replicas = [
            ProcessPoolExecutor(1, mp_context=context, initializer=_start_replica, initargs=(settings, plan.threads))
            for _ in range(plan.replicas)
        ]
        try:
            with self._replica_failures():
                identities = [replica.submit(_identity) for replica in self._replicas]  # every replica loads now
                self.encoder = [identity.result() for identity in identities][0]
        except BaseException:
            self.close()
            raise

    def encode(self, dataset: Any) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(job, first_row, features)`` for every item of ``dataset``; each job's rows in order.

        ``dataset`` is a picklable map of items ``(job, first_row, tiles)``
        with an ``items`` list of ``(job, rows)`` (a
        :class:`~virtualst.embed.loader.TileBatches`); replicas read the tiles.
        Jobs interleave: several are written at once.
        """
        payload = pickle.dumps(dataset)
        queue = ChunkQueue(chunk_items(dataset))
        first_rows: dict[int, int] = {}
        for job, rows in dataset.items:
            first_rows.setdefault(job, int(rows[0]))
        in_order = InOrder(first_rows)
        running: dict[Future, int] = {}
        last_job: list[int | None] = [None] * len(self._replicas)  # of the chunk each replica got last
        has_dataset: set[int] = set()

        def dispatch(replica: int) -> None:
            task = queue.take(last_job[replica])
            if task is not None:
                last_job[replica], chunk = task
                # A replica runs its chunks in order: only the first carries the dataset.
                sent = None if replica in has_dataset else payload
                has_dataset.add(replica)
                running[self._replicas[replica].submit(_encode_chunk, sent, chunk)] = replica

        try:
            with self._replica_failures():
                for _ in range(IN_FLIGHT):  # a queued chunk hides each round trip through the pipes
                    for replica in range(len(self._replicas)):
                        dispatch(replica)
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        replica = running.pop(future)
                        results = future.result()
                        dispatch(replica)
                        yield from in_order.add(results)
        finally:
            for future in running:  # the caller stopped early or a replica failed
                future.cancel()

    @contextmanager
    def _replica_failures(self) -> Iterator[None]:
        try:
            yield
        except BrokenProcessPool as exc:
            raise EncoderError(
                f"{self.name}: an encoder replica process died (out of memory, killed, or a script without "
                "'if __name__ == \"__main__\":'); embed in one process with --cpu-replicas 1"
            ) from exc

    def close(self) -> None:
        """Stop the replicas now (work not yet written is dropped; caches stay resumable)."""
        for replica in self._replicas:
            # A busy replica would finish its chunk first; Python < 3.14 has no public way to stop it.
            processes = list((replica._processes or {}).values())
            replica.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()

    def __enter__(self) -> EncoderReplicas:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
