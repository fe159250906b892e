"""User errors survive pickling (Ray and multiprocessing carry them between processes)."""

from __future__ import annotations

import pickle
from pathlib import Path

from virtualst.errors import EncoderError, InputError, MissingDependencyError


def test_input_error_round_trips_with_its_attributes():
    err = pickle.loads(pickle.dumps(InputError("/data/x.h5", "broken")))
    assert type(err) is InputError and str(err) == "/data/x.h5: broken"
    assert err.path == Path("/data/x.h5") and err.problem == "broken"


def test_missing_dependency_round_trips_with_its_hint():
    err = pickle.loads(pickle.dumps(MissingDependencyError("ray", extra="ray", purpose="distributed embedding")))
    assert type(err) is MissingDependencyError
    assert str(err) == "ray is needed for distributed embedding: pip install 'virtualst[ray]'"


def test_encoder_error_round_trips():
    err = pickle.loads(pickle.dumps(EncoderError("unknown encoder 'x'")))
    assert type(err) is EncoderError and str(err) == "unknown encoder 'x'"
