"""Benchmark tasks: which samples, which genes, which targets, which folds.

A :class:`Task` names its samples' source, the genes to predict, the target
normalisations and the split. Two kinds of source (a registry, :data:`SOURCES`):

``directory``
    A folder any :mod:`virtualst.embed.readers` reader understands (her2st,
    STUtility, Space Ranger, HEST-1k...). ``task.load`` embeds the in-tissue
    spots of each slide (reusing caches) and aligns counts by barcode.
``hest-bench``
    A HEST-Benchmark task folder (:mod:`virtualst.bench.hest_bench`):
    pre-cut patches are embedded, counts aligned to the patch barcodes.

Built-in tasks (:func:`list_tasks`) live under one data root:
``{data_root}/her2st`` (her2st in its original layout; one patient, so
leave-one-sample-out), ``{data_root}/stutility_mob`` (leave-one-animal-out)
and the ten HEST-Benchmark tasks ``{data_root}/{IDC,PRAD,...}`` with their
official splits and pinned ``var_50genes.json``.

User tasks are YAML files (:func:`load_task_yaml`)::

    name: my-task
    data: sections/            # relative to this file
    format: directory          # or hest-bench
    reader: legacy_st          # optional: a reader name; detected otherwise
    samples: [A1, A2, B1]      # optional subset
    genes: hvg:50              # heg:K, a list, or a gene-list file
    normalization: [log1p, cpm-log1p]
    split: patient-kfold:3     # official needs `splits: folder/`
    patients: {A1: P1, A2: P1, B1: P2}   # optional, overrides the reader
    description: free text
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import yaml

from virtualst.bench.data import SampleData
from virtualst.bench.hest_bench import GENES_FILE, HestBenchTask
from virtualst.bench.splits import Fold, SplitError, SplitSpec, make_folds
from virtualst.embed.runner import EmbedSettings
from virtualst.errors import InputError, VirtualSTError
from virtualst.heads.targets import NORMALIZATIONS, GeneSpec
from virtualst.sample import Sample

GENE_RULES = ("hvg:", "heg:", "list:")


class TaskError(VirtualSTError, ValueError):
    """A task name or definition is unusable (not tied to one file)."""


# ------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class DirectorySource:
    """Slides with spots, read by a sample reader.

    Parameters
    ----------
    path
        Folder (or file) the reader reads.
    reader
        Name of a registered reader; ``None`` detects it.
    sample_ids
        Read only these samples (default: all).
    patients
        Sample id -> patient id, overriding the reader's.
    splits
        Folder of ``train_{k}.csv``/``test_{k}.csv`` files for the ``official`` split.
    """

    kind: ClassVar[str] = "directory"
    path: Path
    reader: str | None = None
    sample_ids: tuple[str, ...] | None = None
    patients: dict[str, str] = field(default_factory=dict)
    splits: Path | None = None

    @cached_property
    def _samples(self) -> list[Sample]:
        from virtualst.embed.readers import READERS, find_reader

        if self.reader is None:
            reader = find_reader(self.path)
        else:
            reader = next((r for r in READERS if r.name == self.reader), None)
            if reader is None:
                raise InputError(self.path, f"unknown reader {self.reader!r}; known: {', '.join(r.name for r in READERS)}")
        ids = self.sample_ids if self.sample_ids is not None else reader.list_samples(self.path)
        samples = [reader.read(self.path, sample_id=sid) for sid in ids]
        for sample in samples:
            sample.patient_id = self.patients.get(sample.sample_id, sample.patient_id)
        return samples

    def samples(self) -> list[Sample]:
        """Every sample (read once, then kept)."""
        return list(self._samples)

    def patients_of(self) -> tuple[list[str], list[str | None]]:
        """Sample ids and their patient ids (``None`` where unknown)."""
        return [s.sample_id for s in self._samples], [s.patient_id for s in self._samples]

    def split_options(self) -> dict[str, Any]:
        return {"split_dir": self.splits}

    def load(self, encoder: str, cache_dir: str | Path, settings: EmbedSettings | None, show_progress: bool) -> list[SampleData]:
        """Embed the in-tissue spots of every slide and align counts to the cache rows."""
        from virtualst.embed.cache import read_embeddings
        from virtualst.embed.runner import embed_samples

        samples = [s.in_tissue() for s in self._samples]
        for s in samples:
            if s.counts is None:
                raise InputError(s.source or s.sample_id, "sample has no counts to benchmark against")
        paths = embed_samples(samples, cache_dir, replace(settings or EmbedSettings(), encoder=encoder), show_progress)
        return [_aligned(s, read_embeddings(p)) for s, p in zip(samples, paths)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.kind, "data": str(self.path)}
        if self.reader is not None:
            out["reader"] = self.reader
        if self.sample_ids is not None:
            out["samples"] = list(self.sample_ids)
        if self.patients:
            out["patients"] = dict(self.patients)
        if self.splits is not None:
            out["splits"] = str(self.splits)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path) -> DirectorySource:
        samples = data.get("samples")
        return cls(
            path=base / str(data["data"]),
            reader=data.get("reader"),
            sample_ids=None if samples is None else tuple(map(str, samples)),
            patients={str(k): str(v) for k, v in (data.get("patients") or {}).items()},
            splits=None if data.get("splits") is None else base / str(data["splits"]),
        )


def _aligned(sample: Sample, embeddings) -> SampleData:
    rows = pd.Index(sample.barcodes).get_indexer(embeddings.barcodes)
    if (rows < 0).any():
        raise InputError(embeddings.path, f"{int((rows < 0).sum())} cached barcodes are not spots of {sample.sample_id}")
    return SampleData(
        sample_id=sample.sample_id,
        patient_id=sample.patient_id if sample.patient_id is not None else sample.sample_id,
        features=embeddings.features,
        counts=sample.counts[rows],
        genes=np.asarray(sample.genes, dtype=str),
        coords_um=sample.centers[rows] * sample.um_per_px,
        barcodes=embeddings.barcodes,
    )


@dataclass(frozen=True)
class HestBenchSource:
    """A HEST-Benchmark task folder.

    Parameters
    ----------
    path
        The task folder (``{bench_root}/{task}``).
    metadata
        Optional metadata table with patients / pixel sizes.
    patients
        Sample id -> patient id, overriding other sources.
    """

    kind: ClassVar[str] = "hest-bench"
    path: Path
    metadata: Path | None = None
    patients: dict[str, str] = field(default_factory=dict)

    @cached_property
    def bench(self) -> HestBenchTask:
        return HestBenchTask(self.path, metadata=self.metadata, patients=self.patients)

    def samples(self) -> list[Sample]:
        raise InputError(self.path, "a HEST-Benchmark task holds pre-cut patches, not slides: use task.load()")

    def patients_of(self) -> tuple[list[str], list[str | None]]:
        patients = self.bench.patient_ids()
        return list(patients), list(patients.values())

    def split_options(self) -> dict[str, Any]:
        return {"split_dir": self.bench.split_dir}

    def load(self, encoder: str, cache_dir: str | Path, settings: EmbedSettings | None, show_progress: bool) -> list[SampleData]:
        return self.bench.load(encoder, cache_dir, settings, show_progress=show_progress)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.kind, "data": str(self.path)}
        if self.metadata is not None:
            out["metadata"] = str(self.metadata)
        if self.patients:
            out["patients"] = dict(self.patients)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path) -> HestBenchSource:
        return cls(
            path=base / str(data["data"]),
            metadata=None if data.get("metadata") is None else base / str(data["metadata"]),
            patients={str(k): str(v) for k, v in (data.get("patients") or {}).items()},
        )


#: format name -> source class (``format:`` in task YAML).
SOURCES: dict[str, type[DirectorySource] | type[HestBenchSource]] = {s.kind: s for s in (DirectorySource, HestBenchSource)}


# --------------------------------------------------------------------------- task
@dataclass
class Task:
    """A benchmark task.

    Parameters
    ----------
    name
        Task name (leaderboard row).
    source
        Where the samples come from (:data:`SOURCES`).
    genes
        Gene spec (``"hvg:50"``, ``"heg:250"``), a pinned list, or a gene-list file path.
    normalization
        Target normalisations (keys of :data:`~virtualst.heads.targets.NORMALIZATIONS`); the first is the primary one.
    split
        How to make folds.
    description
        One line for listings.
    """

    name: str
    source: DirectorySource | HestBenchSource
    genes: str | tuple[str, ...] = "hvg:50"
    normalization: tuple[str, ...] = ("log1p",)
    split: SplitSpec = field(default_factory=lambda: SplitSpec("leave-one-patient-out"))
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.normalization, str):
            self.normalization = (self.normalization,)
        self.normalization = tuple(self.normalization)
        unknown = [n for n in self.normalization if n not in NORMALIZATIONS]
        if unknown or not self.normalization:
            raise TaskError(f"task {self.name}: unknown normalisation {unknown or '(none)'}; known: {', '.join(NORMALIZATIONS)}")
        self.split = SplitSpec.parse(self.split)
        if not isinstance(self.genes, str):
            self.genes = tuple(map(str, self.genes))
        elif self.genes.startswith(GENE_RULES):
            GeneSpec.parse(self.genes)  # fail early on "hvg:x"

    # ------------------------------------------------------------------ parts
    def gene_spec(self) -> GeneSpec:
        """The genes to predict, reading a gene-list file if the task pins one."""
        if isinstance(self.genes, str) and not self.genes.startswith(GENE_RULES) and not Path(self.genes).is_file():
            raise InputError(self.genes, f"gene list of task {self.name} not found")
        return GeneSpec.parse(self.genes)

    def samples(self) -> list[Sample]:
        """The samples of a directory task (slides with spots and counts)."""
        return self.source.samples()

    def folds(self) -> list[Fold]:
        """Train/test folds over the task's sample ids."""
        ids, patients = self.source.patients_of()
        try:
            return make_folds(self.split, ids, patients, **self.source.split_options())
        except SplitError as exc:
            raise InputError(self.source.path, f"task {self.name}: {exc}") from None

    def load(
        self, encoder: str, cache_dir: str | Path, settings: EmbedSettings | None = None, show_progress: bool = True
    ) -> list[SampleData]:
        """Embeddings aligned with counts for every sample, embedding what is not cached yet.

        Parameters
        ----------
        encoder
            Encoder registry name or spec; overrides ``settings.encoder``.
        cache_dir
            Embedding cache root (``{cache_dir}/{encoder}/{sample_id}.h5``).
        settings
            Other run settings (device, batch size...).
        show_progress
            Draw a progress bar while embedding.
        """
        return self.source.load(encoder, cache_dir, settings, show_progress)

    # ------------------------------------------------------------------- YAML
    def to_dict(self) -> dict[str, Any]:
        """The YAML form (absolute paths)."""
        return {
            "name": self.name,
            **self.source.to_dict(),
            "genes": self.genes if isinstance(self.genes, str) else list(self.genes),
            "normalization": list(self.normalization),
            "split": str(self.split),
            "description": self.description,
        }

    def to_yaml(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as YAML; :func:`load_task_yaml` reads it back."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        return path


YAML_KEYS = {"name", "data", "format", "reader", "samples", "genes", "normalization", "split", "splits", "patients", "metadata", "description"}
#: Keys each source kind accepts beyond the common ones.
SOURCE_KEYS = {"directory": {"reader", "samples", "splits", "patients"}, "hest-bench": {"metadata", "patients"}}


def load_task_yaml(path: str | Path) -> Task:
    """Read a user-defined task (see the module docstring for the keys).

    Relative paths are relative to the YAML file. A ``hest-bench`` task
    defaults to its ``var_50genes.json`` genes and the official split.

    Raises
    ------
    InputError
        Unreadable YAML, unknown or missing keys, bad values.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot read task YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise InputError(path, "a task YAML must be a mapping of keys to values")
    missing = [k for k in ("name", "data") if k not in data]
    unknown = sorted(set(data) - YAML_KEYS)
    if missing or unknown:
        raise InputError(path, f"missing key(s) {missing} / unknown key(s) {unknown}; keys: {', '.join(sorted(YAML_KEYS))}")
    kind = data.get("format", "directory")
    if kind not in SOURCES:
        raise InputError(path, f"unknown format {kind!r}; known: {', '.join(SOURCES)}")
    misplaced = sorted(set(data) & (set().union(*SOURCE_KEYS.values()) - SOURCE_KEYS[kind]))
    if misplaced:
        raise InputError(path, f"key(s) {', '.join(misplaced)} do not apply to format {kind!r}")
    base = path.parent
    source = SOURCES[kind].from_dict(data, base)
    default_genes, default_split = ("hvg:50", "leave-one-patient-out") if kind == "directory" else (GENES_FILE, "official")
    genes = data.get("genes", default_genes)
    if isinstance(genes, str) and not genes.startswith(GENE_RULES):
        genes = str((source.path if "genes" not in data else base) / genes)
    try:
        return Task(
            name=str(data["name"]),
            source=source,
            genes=genes,
            normalization=data.get("normalization", "log1p"),
            split=str(data.get("split", default_split)),
            description=str(data.get("description", "")),
        )
    except (VirtualSTError, ValueError) as exc:
        raise InputError(path, str(exc)) from None


# ------------------------------------------------------------------- built-ins
@dataclass(frozen=True)
class BuiltinTask:
    """A task whose data sit at ``{data_root}/{subdir}``."""

    name: str
    subdir: str
    kind: str
    genes: str
    split: str
    description: str
    normalization: tuple[str, ...] = ("log1p", "cpm-log1p")  # DESIGN §4: always report a library-size-normalised target too
    aliases: tuple[str, ...] = ()

    def resolve(self, data_root: str | Path) -> Task:
        path = Path(data_root) / self.subdir
        genes = str(path / self.genes) if self.genes == GENES_FILE else self.genes
        return Task(self.name, SOURCES[self.kind](path), genes, self.normalization, SplitSpec.parse(self.split), self.description)


#: The ten HEST-Benchmark tasks: name -> (description, aliases).
HEST_TASKS = {
    "IDC": ("invasive ductal carcinoma (breast)", ()),
    "PRAD": ("prostate adenocarcinoma", ()),
    "PAAD": ("pancreatic adenocarcinoma", ()),
    "SKCM": ("skin cutaneous melanoma", ()),
    "COAD": ("colon adenocarcinoma", ()),
    "READ": ("rectum adenocarcinoma", ()),
    "ccRCC": ("clear cell renal cell carcinoma (kidney)", ()),
    "HCC": ("hepatocellular carcinoma (liver)", ()),
    "LUNG": ("lung adenocarcinoma", ("LUAD",)),
    "LYMPH_IDC": ("invasive ductal carcinoma metastases in axillary lymph nodes", ()),
}

BUILTIN_TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask(
            "her2st", "her2st", "directory", "hvg:50", "leave-one-sample-out",
            "her2st sections, original layout; one patient, so leave-one-sample-out (not patient-disjoint)",
        ),
        BuiltinTask(
            "stutility-mob", "stutility_mob", "directory", "hvg:50", "leave-one-patient-out",
            "STUtility mouse olfactory bulb MOB1-3; leave-one-animal-out",
        ),
        *(
            BuiltinTask(name, name, "hest-bench", GENES_FILE, "official", f"HEST-Benchmark {name}: {what}; official splits", aliases=aliases)
            for name, (what, aliases) in HEST_TASKS.items()
        ),
    )
}


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return list(BUILTIN_TASKS)


def _builtin(name: str) -> BuiltinTask | None:
    for task in BUILTIN_TASKS.values():
        if name in (task.name, *task.aliases):
            return task
    folded = {n.lower(): t for t in BUILTIN_TASKS.values() for n in (t.name, *t.aliases)}
    return folded.get(name.lower())


def get_task(name: str, data_root: str | Path) -> Task:
    """A built-in task (name or alias, any case) with its data under ``data_root``, or a task YAML file.

    Raises
    ------
    TaskError
        Unknown name.
    InputError
        The task's data folder is missing.
    """
    if str(name).endswith((".yaml", ".yml")):
        return load_task_yaml(name)
    builtin = _builtin(str(name))
    if builtin is None:
        raise TaskError(f"unknown task {name!r}; built-in: {', '.join(BUILTIN_TASKS)} (or a task .yaml file)")
    task = builtin.resolve(data_root)
    if not task.source.path.exists():
        raise InputError(task.source.path, f"data of task {builtin.name} not found (expected {{data_root}}/{builtin.subdir})")
    return task


__all__ = [
    "BUILTIN_TASKS", "DirectorySource", "HestBenchSource", "SOURCES", "Task", "TaskError",
    "get_task", "list_tasks", "load_task_yaml",
]
