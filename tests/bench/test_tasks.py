"""Tasks: built-in registry, YAML round trip, folds on real data, her2st end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from virtualst.bench.splits import SplitSpec
from virtualst.bench.tasks import (
    BUILTIN_TASKS,
    DirectorySource,
    HestBenchSource,
    Task,
    TaskError,
    get_task,
    list_tasks,
    load_task_yaml,
)
from virtualst.embed.runner import EmbedSettings, FeatureExtractor
from virtualst.errors import InputError

HEST = ["IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "ccRCC", "HCC", "LUNG", "LYMPH_IDC"]


def test_builtin_tasks_are_listed_with_their_protocols(tmp_path):
    assert list_tasks() == ["her2st", "stutility-mob", *HEST]
    her2st = BUILTIN_TASKS["her2st"].resolve(tmp_path)
    assert her2st.split == SplitSpec("leave-one-sample-out") and her2st.genes == "hvg:50"
    assert her2st.source == DirectorySource(tmp_path / "her2st")
    assert BUILTIN_TASKS["stutility-mob"].resolve(tmp_path).split == SplitSpec("leave-one-patient-out")
    idc = BUILTIN_TASKS["IDC"].resolve(tmp_path)
    assert idc.source == HestBenchSource(tmp_path / "IDC") and idc.split == SplitSpec("official")
    assert idc.genes == str(tmp_path / "IDC" / "var_50genes.json")
    assert all(t.normalization == ("log1p", "cpm-log1p") for t in BUILTIN_TASKS.values())


def test_get_task_finds_names_aliases_and_reports_missing_data(tmp_path):
    for name in ("LUNG", "LUAD", "luad", "idc"):
        (tmp_path / name.upper().replace("LUAD", "LUNG")).mkdir(exist_ok=True)
        assert get_task(name, tmp_path).name in ("LUNG", "IDC")
    with pytest.raises(TaskError, match="unknown task 'BRCA'.*her2st"):
        get_task("BRCA", tmp_path)
    with pytest.raises(InputError, match=r"data of task her2st not found \(expected \{data_root\}/her2st\)"):
        get_task("her2st", tmp_path)


def test_yaml_round_trip(tmp_path):
    task = Task(
        name="mine",
        source=DirectorySource(tmp_path / "data", reader="legacy_st", sample_ids=("A1", "B1"), patients={"A1": "P1", "B1": "P2"}),
        genes=("GENE1", "GENE2"),
        normalization=("log1p", "cpm-log1p"),
        split=SplitSpec.parse("patient-kfold:2"),
        description="two sections",
    )
    (tmp_path / "sub").mkdir()
    path = task.to_yaml(tmp_path / "sub" / "task.yaml")
    assert load_task_yaml(path) == task
    assert yaml.safe_load(path.read_text())["split"] == "patient-kfold:2"
    hest = Task("T", HestBenchSource(tmp_path / "T", metadata=tmp_path / "m.csv"), str(tmp_path / "T" / "var_50genes.json"), "log1p", "official")
    assert load_task_yaml(hest.to_yaml(tmp_path / "hest.yaml")) == hest


def test_yaml_relative_paths_and_defaults(tmp_path):
    (tmp_path / "tasks").mkdir()
    path = tmp_path / "tasks" / "t.yaml"
    path.write_text("name: t\ndata: ../bench/IDC\nformat: hest-bench\n")
    task = load_task_yaml(path)
    assert task.source.path == tmp_path / "tasks" / ".." / "bench" / "IDC"
    assert task.genes == str(task.source.path / "var_50genes.json") and task.split == SplitSpec("official")
    assert task.normalization == ("log1p",)
    path.write_text("name: t\ndata: sections\ngenes: genes.txt\nsplit: official\nsplits: folds\nnormalization: cpm-log1p\n")
    task = load_task_yaml(path)
    assert task.genes == str(tmp_path / "tasks" / "genes.txt") and task.source.splits == tmp_path / "tasks" / "folds"
    with pytest.raises(InputError, match="genes.txt: gene list of task t not found"):
        task.gene_spec()
    (tmp_path / "tasks" / "genes.txt").write_text("A\nB\n")
    assert task.gene_spec().genes == ("A", "B")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: t\n", r"missing key\(s\) \['data'\]"),
        ("name: t\ndata: x\nspilt: official\n", r"unknown key\(s\) \['spilt'\]"),
        ("name: t\ndata: x\nformat: zarr\n", "unknown format 'zarr'"),
        ("name: t\ndata: x\nformat: hest-bench\nreader: visium\n", "reader do not apply to format 'hest-bench'"),
        ("name: t\ndata: x\nsplit: random\n", "unknown split scheme 'random'"),
        ("name: t\ndata: x\nsplit: patient-kfold\n", "needs a fold count"),
        ("name: t\ndata: x\nnormalization: [log1p, tpm]\n", "unknown normalisation"),
        ("name: t\ndata: x\ngenes: hvg:many\n", "hvg:K"),
        ("- a list\n", "must be a mapping"),
        ("name: [unclosed\n", "cannot read task YAML"),
    ],
)
def test_bad_task_yaml_names_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as info:
        load_task_yaml(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_hest_task_has_no_slides(tmp_path):
    (tmp_path / "IDC" / "splits").mkdir(parents=True)
    with pytest.raises(InputError, match="pre-cut patches, not slides"):
        get_task("IDC", tmp_path).samples()


# ------------------------------------------------------------------ real data
@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore:.*dropped .* counts row:UserWarning")  # the MOB files' own stray rows
def test_stutility_mob_folds_leave_one_animal_out(mob_dir):
    task = get_task("stutility-mob", mob_dir.parent)
    folds = task.folds()
    assert [(f.train, f.test) for f in folds] == [(("MOB3",), ("MOB1", "MOB2")), (("MOB1", "MOB2"), ("MOB3",))]
    assert all(f.patient_disjoint and f.patients_known for f in folds)


@pytest.mark.realdata
def test_yaml_task_on_real_sections_with_a_patients_mapping(her2st_dir, tmp_path):
    path = tmp_path / "t.yaml"
    spec = {"name": "pairs", "data": str(her2st_dir), "samples": ["C2", "C3", "C4"], "patients": {"C2": "P1", "C3": "P1", "C4": "P2"}}
    path.write_text(yaml.safe_dump(spec))
    task = load_task_yaml(path)
    assert [s.patient_id for s in task.samples()] == ["P1", "P1", "P2"]
    assert [(f.test, f.patient_disjoint) for f in task.folds()] == [(("C2", "C3"), True), (("C4",), True)]
    # The real data has one patient: a patient split is refused, naming the data folder.
    path.write_text(yaml.safe_dump({"name": "lopo", "data": str(her2st_dir), "samples": ["C2", "C3"], "split": "patient-kfold:2"}))
    with pytest.raises(InputError, match=r"her2st: task lopo: patient-kfold:2 needs at least 2 patients, found 1"):
        load_task_yaml(path).folds()


@pytest.mark.realdata
def test_her2st_task_end_to_end(her2st_dir, her2st_cache, monkeypatch):
    task = get_task("her2st", her2st_dir.parent)
    folds = task.folds()
    assert [f.test for f in folds] == [("C2",), ("C3",), ("C4",), ("C5",)]
    assert all(len(f.train) == 3 and not f.patient_disjoint for f in folds), "one patient: LOSO folds are not patient-disjoint"

    data = task.load("efficientnet_lite0", her2st_cache, EmbedSettings(batch_size=64, device="cpu"), show_progress=False)
    assert [d.sample_id for d in data] == ["C2", "C3", "C4", "C5"]
    samples = {s.sample_id: s.in_tissue() for s in task.samples()}
    for d in data:
        sample = samples[d.sample_id]
        assert d.patient_id == "C"
        assert d.features.shape == (sample.n_spots, 1280) and np.isfinite(d.features).all()
        assert d.counts.shape == (sample.n_spots, len(sample.genes)) and list(d.genes) == list(sample.genes)
        np.testing.assert_array_equal(d.barcodes, sample.barcodes)
        np.testing.assert_array_equal(d.counts.toarray(), sample.counts.toarray())
        np.testing.assert_allclose(d.coords_um, sample.centers * sample.um_per_px)
        assert Path(her2st_cache / "efficientnet_lite0" / f"{d.sample_id}.h5").is_file()

    calls = []
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, tiles: calls.append(1))
    again = task.load("efficientnet_lite0", her2st_cache, EmbedSettings(batch_size=64, device="cpu"), show_progress=False)
    assert not calls and all(np.array_equal(a.features, b.features) for a, b in zip(data, again)), "caches are reused"
