"""Embed samples over a Ray cluster (``virtualst embed --ray``).

Each Ray worker is an actor that loads the encoder once and embeds whole
samples with the single-process :func:`~virtualst.embed.runner.embed_with`,
so the cache semantics are exactly those of a local run: complete caches
are reused, ``.partial`` files resume, caches made with other settings are
refused, and only finished files carry the final name.

Before any tile is read, one worker plans every sample with
:func:`~virtualst.embed.runner.plan_job` (the same check a local run makes
first): bad input fails at once, and complete caches are never shipped to a
worker. Samples then go out largest first to whichever worker is free.

When there are more workers than samples, large samples are cut into
batch-aligned shards (:mod:`virtualst.embed.shards`) that workers embed as
their own resumable caches; the worker that finds a sample's last shard done
merges them into the sample's cache. A sample with a partial cache from an
earlier run resumes whole instead.

Ray is optional: ``pip install 'virtualst[ray]'``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtualst.embed.runner import (
    EmbedSettings,
    default_batch_size,
    default_workers,
    embed_with,
    make_extractor,
    open_cache_writer,
    plan_job,
)
from virtualst.embed.shards import MIN_SHARD_SPOTS, SHARD_DIR, merge_shards, shard_ranges, shard_root, shard_sample, shard_size
from virtualst.errors import InputError, MissingDependencyError, VirtualSTError

if TYPE_CHECKING:  # pragma: no cover
    from virtualst.embed.extractor import FeatureExtractor
    from virtualst.sample import Sample

#: GPU workers get at most this many CPUs by default (tile reading for one GPU).
MAX_DEFAULT_CPUS_PER_GPU = 8


def import_ray() -> Any:
    """Return the ``ray`` module, or raise :class:`MissingDependencyError` with the install hint."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", extra="ray", purpose="distributed embedding (--ray)") from None
    return ray


# ------------------------------------------------------------------------- the worker
@dataclass
class SampleOutcome:
    """What one worker did for one sample, or for one shard of it (``shard`` set)."""

    index: int
    path: Path
    tiles: int  # tiles encoded by this run (fewer than the spots when resumed)
    shard: int | None = None


@dataclass
class Plan:
    """What planning found: complete caches to reuse and partial ones to resume, by sample index."""

    reused: dict[int, Path]
    resumed: set[int]


class _CountingExtractor:
    """Counts the tiles passing through an extractor (resumed rows are not encoded again)."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        self._extractor = extractor
        self.tiles = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._extractor, name)

    def __call__(self, tiles: Any) -> Any:
        self.tiles += len(tiles)
        return self._extractor(tiles)


class EmbedWorker:
    """Ray actor body: one encoder, loaded on first use and kept for every sample it embeds.

    Parameters
    ----------
    settings
        Run settings with the worker's device and reading processes resolved.
    threads
        Torch threads, the CPUs Ray reserved for this worker (no oversubscription).
    """

    def __init__(self, settings: EmbedSettings, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.settings = settings
        self._extractor: FeatureExtractor | None = None

    def _get_extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = make_extractor(self.settings)
        return self._extractor

    def warm(self) -> None:
        """Load the encoder now, while another worker plans."""
        self._get_extractor()

    def plan(self, samples: list[Sample], cache_dir: str) -> Plan:
        """Complete and partial caches, by sample index; raises the user error of the first bad sample."""
        extractor = self._get_extractor()
        planned = [plan_job(s, extractor.encoder, extractor.device, cache_dir, self.settings) for s in samples]
        return Plan(
            reused={i: p for i, p in enumerate(planned) if isinstance(p, Path)},
            resumed={i for i, p in enumerate(planned) if not isinstance(p, Path) and p.start},
        )

    def embed(self, index: int, sample: Sample, cache_dir: str, shard: int | None = None) -> SampleOutcome:
        """Embed one sample (or shard) into the cache with the single-process runner."""
        counting = _CountingExtractor(self._get_extractor())
        (path,) = embed_with(counting, [sample], cache_dir, self.settings)  # type: ignore[arg-type]
        return SampleOutcome(index, path, counting.tiles, shard)

    def merge(self, index: int, sample: Sample, shard_paths: list[Path], cache_dir: str) -> SampleOutcome:
        """Write a sample's cache from its finished shards, then delete them."""
        extractor = self._get_extractor()
        job = plan_job(sample, extractor.encoder, extractor.device, cache_dir, self.settings)
        if isinstance(job, Path):  # completed meanwhile (another run)
            path = job
        else:
            path = merge_shards(open_cache_writer(job, extractor.encoder.dim, self.settings), sample.barcodes, shard_paths)
        shutil.rmtree(shard_root(cache_dir, sample.sample_id), ignore_errors=True)
        return SampleOutcome(index, path, 0)


# ------------------------------------------------------------------- resource planning
@dataclass(frozen=True)
class WorkerResources:
    """What each Ray worker reserves and how it runs."""

    gpus: float
    cpus: float
    device: str
    num_workers: int | None


def worker_resources(
    settings: EmbedSettings, cluster: dict[str, float], gpus_per_task: float | None = None, cpus_per_task: float | None = None
) -> WorkerResources:
    """Resources per worker for ``settings`` on a cluster with ``cluster`` total resources.

    A GPU per worker when the settings resolve to CUDA there (``auto`` with
    GPUs in the cluster, or ``cuda``), else none; ``gpus_per_task``
    overrides (fractions share a GPU). CPU workers reserve one CPU; GPU
    workers their share of the cluster's CPUs (at most 8) to read tiles.
    Ray pins each GPU worker to its own GPU(s), so ``cuda:N`` becomes
    ``cuda`` inside the worker.
    """
    cluster_gpus = float(cluster.get("GPU", 0))
    wants_cuda = settings.device.startswith("cuda") or (settings.device == "auto" and cluster_gpus > 0)
    gpus = float(gpus_per_task) if gpus_per_task is not None else (1.0 if wants_cuda else 0.0)
    if gpus < 0:
        raise VirtualSTError(f"GPUs per task must be >= 0, not {gpus:g}")
    if settings.device.startswith("cuda") and gpus == 0:
        raise VirtualSTError(f"device {settings.device} needs GPUs per task > 0 on Ray")
    if gpus > cluster_gpus:
        raise VirtualSTError(f"each Ray task asks for {gpus:g} GPU(s) but the cluster has {cluster_gpus:g}")
    if cpus_per_task is None:
        share = cluster.get("CPU", 1) * gpus / cluster_gpus if gpus else 1
        cpus_per_task = max(1, min(MAX_DEFAULT_CPUS_PER_GPU, int(share)))
    if cpus_per_task <= 0:
        raise VirtualSTError(f"CPUs per task must be > 0, not {cpus_per_task:g}")
    device = "cuda" if gpus and settings.device != "cpu" else "cpu"  # never a GPU that Ray did not reserve
    num_workers = settings.num_workers
    if num_workers is None:  # the local default, bounded by the reserved CPUs (one is the encoder's)
        import torch

        num_workers = min(default_workers(torch.device(device)), max(0, int(cpus_per_task) - 1))
    return WorkerResources(gpus=gpus, cpus=float(cpus_per_task), device=device, num_workers=num_workers)


def worker_count(resources: WorkerResources, cluster: dict[str, float], n_samples: int, max_workers: int | None = None) -> int:
    """How many workers fit in the cluster at once, no more than ``n_samples`` (samples, or shards when sharding)."""
    slots = int(cluster.get("CPU", 0) // resources.cpus)
    if resources.gpus:
        slots = min(slots, int(cluster.get("GPU", 0) // resources.gpus))
    if slots < 1:
        have = f"{cluster.get('CPU', 0):g} CPU(s), {cluster.get('GPU', 0):g} GPU(s)"
        raise VirtualSTError(f"the Ray cluster ({have}) cannot host a worker with {resources.cpus:g} CPU(s) and {resources.gpus:g} GPU(s)")
    return max(1, min(slots, n_samples, max_workers or slots))


# ----------------------------------------------------------------------------- driver
@dataclass
class RayEmbedReport:
    """Result of a distributed run.

    Attributes
    ----------
    paths
        Cache file of each sample, in sample order.
    embedded
        Samples computed (or resumed) by this run.
    reused
        Samples whose complete cache was reused untouched.
    tiles
        Tiles encoded by this run.
    workers
        Ray workers (actors) that planned or embedded.
    seconds
        Wall time of the whole run, Ray start-up included.
    """

    paths: list[Path]
    embedded: int
    reused: int
    tiles: int
    workers: int
    seconds: float

    def summary(self) -> str:
        """One line for the terminal."""
        return (
            f"embedded {self.embedded} samples ({self.tiles} tiles) on {self.workers} workers "
            f"in {self.seconds:.1f} s; {self.reused} reused"
        )


def shippable(sample: Sample) -> Sample:
    """A copy of ``sample`` to send to workers: no counts, and an absolute image path.

    Workers reopen the image from its path (the handle pickles lazily);
    counts are not needed for embedding and can be large.
    """
    if sample.image is None:
        raise InputError(sample.source or sample.sample_id, "sample has no image to tile")
    out = copy.copy(sample)  # a shallow copy skips re-validation
    out.counts, out.genes = None, None
    out.image = copy.copy(sample.image)  # a fresh lazy handle
    out.image.path = out.image.path.absolute()
    return out


def check_unique_ids(samples: list[Sample]) -> None:
    """Refuse two samples with one id: their workers would write the same cache file at once."""
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise InputError(sample.source or sample.sample_id, f"sample id {sample.sample_id!r} appears twice; caches are named by id")
        seen.add(sample.sample_id)


def connect(ray: Any, address: str | None, quiet: bool) -> bool:
    """Join ``address`` or start a local instance; return whether this call did so.

    An already initialised Ray is used as it is (and left running).
    """
    if ray.is_initialized():
        return False
    ray.init(
        address=address or "local",  # "local": a new instance, never a cluster found by chance
        include_dashboard=False if address is None else None,
        logging_level=logging.ERROR if quiet else logging.WARNING,
    )
    return True


def ray_get(ref: Any) -> Any:
    """``ray.get``, raising a user error Ray could transport as itself, not as a remote traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, VirtualSTError):
            raise exc.cause from None
        raise


def most_tasks(samples: list[Sample], shard_spots: int | None) -> int:
    """Most embedding tasks a run can have: one per sample, or per smallest shard when sharding."""
    if shard_spots == 0:
        return len(samples)
    return max(len(samples), sum(s.n_spots for s in samples) // (shard_spots or MIN_SHARD_SPOTS))


def start_workers(ray: Any, resources: WorkerResources, settings: EmbedSettings, n_workers: int) -> list[Any]:
    """Start ``n_workers`` actors; all but the first begin loading the encoder at once."""
    remote_settings = dataclasses.replace(settings, device=resources.device, num_workers=resources.num_workers)
    # No restarts or retries: a lost worker fails the run, and running it again resumes from the partial files.
    actor_class = ray.remote(EmbedWorker).options(num_cpus=resources.cpus, num_gpus=resources.gpus)
    actors = [actor_class.remote(remote_settings, int(resources.cpus)) for _ in range(n_workers)]
    for actor in actors[1:]:
        actor.warm.remote()  # the first one loads while planning; failures resurface at embed
    return actors


def plan_reuse(planner: Any, samples: list[Sample], root: Path, overwrite: bool) -> Plan:
    """Check every sample on one worker before any work: which caches to reuse, which to resume.

    With ``overwrite`` nothing is reused, and planning would delete caches:
    the runs themselves do that, as in a local run.
    """
    if overwrite:
        return Plan(reused={}, resumed=set())
    return ray_get(planner.plan.remote(samples, str(root)))


@dataclass
class Task:
    """One call for a free worker: ``method(*args)``; ``tiles`` advance the progress bar when it ends."""

    method: str
    args: tuple
    tiles: int


def embed_tasks(jobs: list[tuple[int, Sample]], root: Path, size: int, resumed: set[int]) -> tuple[list[Task], dict[int, int]]:
    """Embedding tasks for ``jobs``, largest first: whole samples, or shards of ``size`` spots.

    Returns the tasks and, for each sharded sample index, its number of shards.
    """
    tasks: list[Task] = []
    shards: dict[int, int] = {}
    for index, sample in jobs:
        if not size or sample.n_spots <= size or index in resumed:  # a partial cache resumes whole
            tasks.append(Task("embed", (index, sample, str(root)), sample.n_spots))
            continue
        ranges = shard_ranges(sample.n_spots, size)
        shards[index] = len(ranges)
        folder = str(shard_root(root, sample.sample_id))
        for k, rows in enumerate(ranges):
            tasks.append(Task("embed", (index, shard_sample(sample, rows, k, len(ranges)), folder, k), len(rows)))
    return sorted(tasks, key=lambda task: -task.tiles), shards


def dispatch(actors: list[Any], pending: deque[Task]) -> Iterator[tuple[SampleOutcome, Task]]:
    """Send ``pending`` tasks to free actors, yielding each outcome as it arrives.

    The caller may add tasks to ``pending`` between outcomes.
    """
    import ray

    idle = deque(actors)
    running: dict[Any, tuple[Any, Task]] = {}
    while pending or running:
        while pending and idle:
            actor, task = idle.popleft(), pending.popleft()
            running[getattr(actor, task.method).remote(*task.args)] = (actor, task)
        (done,), _ = ray.wait(list(running), num_returns=1)
        actor, task = running.pop(done)
        idle.append(actor)
        yield ray_get(done), task


def run_tasks(
    actors: list[Any], tasks: list[Task], shards: dict[int, int], samples: list[Sample], root: Path,
    total: int, done: int, desc: str, show_progress: bool,
) -> dict[int, SampleOutcome]:
    """Run ``tasks`` under a tqdm bar over tiles (``done`` of ``total`` already cached); return outcomes by sample index.

    When the last shard of a sample finishes, its merge goes to the next free worker.
    """
    from tqdm.auto import tqdm

    outcomes: dict[int, SampleOutcome] = {}
    encoded: Counter[int] = Counter()  # tiles per sample, its shards' included
    shard_paths: dict[int, dict[int, Path]] = {}
    pending = deque(tasks)
    with tqdm(total=total, initial=done, unit="tile", desc=desc, disable=not show_progress) as bar:
        for outcome, task in dispatch(actors, pending):
            bar.update(task.tiles)
            encoded[outcome.index] += outcome.tiles
            if outcome.shard is None:  # a whole sample, or a merge
                outcomes[outcome.index] = dataclasses.replace(outcome, tiles=encoded[outcome.index])
                continue
            parts = shard_paths.setdefault(outcome.index, {})
            parts[outcome.shard] = outcome.path
            if len(parts) == shards[outcome.index]:
                ordered = [parts[k] for k in range(len(parts))]
                pending.appendleft(Task("merge", (outcome.index, samples[outcome.index], ordered, str(root)), 0))
    return outcomes


def embed_samples_ray(
    samples: Iterable[Sample],
    cache_dir: str | Path,
    settings: EmbedSettings | None = None,
    address: str | None = None,
    gpus_per_task: float | None = None,
    cpus_per_task: float | None = None,
    max_workers: int | None = None,
    show_progress: bool = True,
    shard_spots: int | None = None,
) -> RayEmbedReport:
    """Embed samples on a Ray cluster into the same caches as :func:`~virtualst.embed.runner.embed_samples`.

    Parameters
    ----------
    samples
        Samples with images. Image files and ``cache_dir`` must be reachable
        at the same absolute paths on every node (a shared file system).
    cache_dir
        Root of the cache.
    settings
        Run settings; ``device="auto"`` means one GPU per worker when the
        cluster has GPUs.
    address
        Ray cluster to join (``auto``, ``host:port``, ``ray://host:10001``);
        ``None`` starts a local instance, shut down at the end. An already
        initialised Ray is used as it is.
    gpus_per_task
        GPUs each worker reserves (default: 1 when the settings resolve to
        CUDA on the cluster, else 0; fractions share a GPU).
    cpus_per_task
        CPUs each worker reserves, also its torch threads (default 1; GPU
        workers: their share of the cluster's CPUs, at most 8).
    max_workers
        Cap on the workers started (default: as many as fit, at most one per sample or shard).
    show_progress
        Draw a tqdm bar over tiles, advanced as samples (or shards) finish.
    shard_spots
        Spots per shard of a large sample, rounded up to whole batches:
        ``None`` shards only when there are more workers than samples
        (equal shares, at least 1,024 spots), ``0`` never.

    Returns
    -------
    RayEmbedReport
        Cache paths in sample order and a summary of the run.

    Raises
    ------
    MissingDependencyError
        Ray is not installed.
    VirtualSTError
        Bad input (no image, duplicate sample ids, a cache with other
        settings, unknown encoder...): one planning step on the first worker
        checks every sample before any tile is embedded.
    """
    import torch

    ray = import_ray()
    began = time.perf_counter()
    settings = settings or EmbedSettings()
    samples = list(samples)
    check_unique_ids(samples)
    shipped = [shippable(s) for s in samples]  # also refuses samples without an image
    if not samples:
        return RayEmbedReport(paths=[], embedded=0, reused=0, tiles=0, workers=0, seconds=0.0)
    root = Path(cache_dir).absolute()
    started = connect(ray, address, quiet=not show_progress)
    actors: list[Any] = []
    try:
        cluster = ray.cluster_resources()
        resources = worker_resources(settings, cluster, gpus_per_task, cpus_per_task)
        actors = start_workers(ray, resources, settings, worker_count(resources, cluster, most_tasks(samples, shard_spots), max_workers))
        plan = plan_reuse(actors[0], shipped, root, settings.overwrite)
        reused = plan.reused
        jobs = [(i, s) for i, s in enumerate(shipped) if i not in reused]
        if shard_spots is None and len(jobs) >= len(actors):
            size = 0  # enough samples to keep every worker busy
        else:
            batch = settings.batch_size or default_batch_size(torch.device(resources.device))
            size = shard_size(sum(s.n_spots for _, s in jobs), len(actors), batch, shard_spots)
        tasks, shards = embed_tasks(jobs, root, size, plan.resumed)
        for actor in actors[max(1, len(tasks)) :]:
            ray.kill(actor)  # more workers than samples (or shards) left to embed
        actors = actors[: max(1, len(tasks))]
        total, done = sum(s.n_spots for s in samples), sum(samples[i].n_spots for i in reused)
        desc = f"embed {settings.encoder} on {len(actors)} Ray workers"
        outcomes = run_tasks(actors, tasks, shards, shipped, root, total, done, desc, show_progress)
        with contextlib.suppress(OSError):
            (root / SHARD_DIR).rmdir()  # every merge removed its own folder; this run left no shard behind
    finally:
        for actor in actors:
            ray.kill(actor)  # frees GPU memory; an unfinished sample stays .partial and resumes next time
        if started:
            ray.shutdown()
    absolute = [reused[i] if i in reused else outcomes[i].path for i in range(len(samples))]
    return RayEmbedReport(
        paths=[Path(cache_dir) / p.relative_to(root) for p in absolute],  # as the caller wrote the root, like embed_samples
        embedded=len(outcomes),
        reused=len(reused),
        tiles=sum(o.tiles for o in outcomes.values()),
        workers=len(actors),
        seconds=time.perf_counter() - began,
    )
