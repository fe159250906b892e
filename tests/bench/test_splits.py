"""Split schemes on toy ids: patients never straddle, except in labelled leave-one-sample-out folds."""

from __future__ import annotations

import pandas as pd
import pytest

from virtualst.bench.splits import SCHEMES, Fold, SplitError, SplitSpec, list_schemes, make_folds, read_split_tables
from virtualst.errors import InputError

IDS = ["a1", "a2", "a3", "b1", "c1", "c2", "d1"]
PATIENTS = ["A", "A", "A", "B", "C", "C", "D"]


def _patients_of(ids):
    by_id = dict(zip(IDS, PATIENTS))
    return {by_id[s] for s in ids}


def _check_partition(folds: list[Fold], ids=IDS) -> None:
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(ids), "every sample is tested exactly once"
    for fold in folds:
        assert not set(fold.train) & set(fold.test)
        assert sorted(fold.train + fold.test) == sorted(ids)
    assert len({f.name for f in folds}) == len(folds)


def test_leave_one_patient_out_holds_out_whole_patients():
    folds = make_folds("leave-one-patient-out", IDS, PATIENTS)
    _check_partition(folds)
    assert [f.name for f in folds] == ["test-patient-A", "test-patient-B", "test-patient-C", "test-patient-D"]
    assert folds[0].test == ("a1", "a2", "a3")
    for fold in folds:
        assert fold.patient_disjoint and fold.patients_known
        assert not _patients_of(fold.train) & _patients_of(fold.test)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_patient_kfold_is_patient_disjoint_balanced_and_deterministic(k):
    folds = make_folds(f"patient-kfold:{k}", IDS, PATIENTS)
    _check_partition(folds)
    assert len(folds) == k
    for fold in folds:
        assert fold.patient_disjoint and not _patients_of(fold.train) & _patients_of(fold.test)
    assert folds == make_folds(SplitSpec("patient-kfold", k), list(IDS), list(PATIENTS))
    sizes = sorted(len(f.test) for f in folds)
    if k == 2:  # A(3) | C(2)+B(1)+D(1): greedy by sample count gives 3/4
        assert sizes == [3, 4]
    if k == 3:
        assert sizes == [2, 2, 3]


def test_leave_one_sample_out_labels_folds_that_share_a_patient():
    folds = make_folds("leave-one-sample-out", IDS, PATIENTS)
    _check_partition(folds)
    assert len(folds) == len(IDS)
    flags = {f.test[0]: f.patient_disjoint for f in folds}
    # Only B and D have a single sample: their folds are patient-disjoint, the others are not.
    assert flags == {"a1": False, "a2": False, "a3": False, "b1": True, "c1": False, "c2": False, "d1": True}


def test_single_patient_only_allows_leave_one_sample_out():
    ids, patients = ["C2", "C3", "C4", "C5"], ["C"] * 4
    with pytest.raises(SplitError, match="at least 2 patients.*leave-one-sample-out"):
        make_folds("leave-one-patient-out", ids, patients)
    folds = make_folds("leave-one-sample-out", ids, patients)
    assert len(folds) == 4 and not any(f.patient_disjoint for f in folds)


def test_unknown_patients_stand_for_themselves_and_folds_say_so():
    folds = make_folds("leave-one-patient-out", ["s1", "s2", "s3"], [None, None, "s1"])
    assert [f.name for f in folds] == ["test-sample-s1", "test-sample-s2", "test-patient-s1"]
    assert all(f.patient_disjoint and not f.patients_known for f in folds)


def test_bad_specs_and_inputs():
    with pytest.raises(SplitError, match="unknown split scheme 'random'.*leave-one-patient-out"):
        SplitSpec.parse("random")
    with pytest.raises(SplitError, match="needs a fold count"):
        SplitSpec.parse("patient-kfold")
    with pytest.raises(SplitError, match="takes no fold count"):
        SplitSpec.parse("leave-one-patient-out:3")
    with pytest.raises(SplitError, match="scheme:K"):
        SplitSpec.parse("patient-kfold:x")
    with pytest.raises(SplitError, match="patient-kfold:5 needs at least 5 patients, found 4"):
        make_folds("patient-kfold:5", IDS, PATIENTS)
    with pytest.raises(SplitError, match="duplicate sample id"):
        make_folds("leave-one-sample-out", ["x", "x"], ["P", "Q"])
    with pytest.raises(SplitError, match="2 sample ids but 1 patient"):
        make_folds("leave-one-sample-out", ["x", "y"], ["P"])
    with pytest.raises(SplitError, match="split_dir"):
        make_folds("official", IDS, PATIENTS)
    assert str(SplitSpec.parse("patient-kfold:5")) == "patient-kfold:5" == str(SplitSpec.parse(SplitSpec("patient-kfold", 5)))
    assert set(list_schemes()) == set(SCHEMES) == {"official", "leave-one-patient-out", "patient-kfold", "leave-one-sample-out"}


def _write_split(split_dir, k, train, test):
    split_dir.mkdir(exist_ok=True)
    for side, ids in (("train", train), ("test", test)):
        pd.DataFrame(
            {"sample_id": ids, "patches_path": [f"patches/{s}.h5" for s in ids], "expr_path": [f"adata/{s}.h5ad" for s in ids]}
        ).to_csv(split_dir / f"{side}_{k}.csv", index=False)


def test_official_splits_are_read_from_csv_files(tmp_path):
    split_dir = tmp_path / "splits"
    _write_split(split_dir, 0, ["a1", "a2", "a3", "b1"], ["c1", "c2"])
    _write_split(split_dir, 1, ["c1", "c2", "b1"], ["a1", "a2", "a3"])
    folds = make_folds("official", IDS, PATIENTS, split_dir=split_dir)
    assert [f.name for f in folds] == ["official-0", "official-1"]
    assert folds[0].train == ("a1", "a2", "a3", "b1") and folds[0].test == ("c1", "c2")
    assert "d1" not in folds[1].train, "samples outside both files stay out of the fold"
    assert all(f.patient_disjoint for f in folds)

    _write_split(split_dir, 1, ["c1", "a1", "b1"], ["a2", "a3"])  # patient A on both sides
    assert [f.patient_disjoint for f in make_folds("official", IDS, PATIENTS, split_dir=split_dir)] == [True, False]
    assert [k for k, *_ in read_split_tables(split_dir)] == [0, 1]


def test_official_split_errors_name_the_file(tmp_path):
    split_dir = tmp_path / "splits"
    _write_split(split_dir, 0, ["a1", "zz9"], ["b1"])
    with pytest.raises(InputError, match=r"train_0\.csv: names 1 unknown sample\(s\): zz9"):
        make_folds("official", IDS, PATIENTS, split_dir=split_dir)
    _write_split(split_dir, 0, ["a1", "b1"], ["b1"])
    with pytest.raises(InputError, match=r"test_0\.csv: sample\(s\) b1 are also in train_0\.csv"):
        make_folds("official", IDS, PATIENTS, split_dir=split_dir)
    (split_dir / "test_0.csv").unlink()
    with pytest.raises(InputError, match="fold 0 has no test_0.csv"):
        make_folds("official", IDS, PATIENTS, split_dir=split_dir)
    (split_dir / "train_0.csv").write_text("name\nb1\n")
    (split_dir / "test_0.csv").write_text("sample_id\na1\n")
    with pytest.raises(InputError, match="no 'sample_id' column"):
        make_folds("official", IDS, PATIENTS, split_dir=split_dir)
    with pytest.raises(InputError, match="split folder not found"):
        make_folds("official", IDS, PATIENTS, split_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no train_"):
        make_folds("official", IDS, PATIENTS, split_dir=tmp_path / "empty")
