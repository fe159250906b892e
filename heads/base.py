"""What every head shares: the pickle-free state it saves to, and the registry.

A head is a scikit-learn regressor (``fit(X, Y)`` / ``predict(X)``,
constructor parameters only in ``__init__``, fitted attributes ending in
``_``) that can also describe itself as a :class:`HeadState`: JSON-able
parameters and metadata, named numpy arrays (saved as safetensors), text
artefacts (LightGBM native models) and child heads (ensembles). Loading a
state never executes code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

#: Registered head classes by kind (``"ridge"``, ``"knn"``...).
HEADS: dict[str, type[Head]] = {}


@dataclass
class HeadState:
    """A fitted head as plain data.

    Parameters
    ----------
    kind
        Registry name of the head class.
    params
        Constructor parameters (``get_params(deep=False)``), JSON-able.
    meta
        Fitted scalars and small lists (chosen alphas, k...), JSON-able.
    arrays
        Fitted arrays by name.
    texts
        Fitted text artefacts by name (e.g. LightGBM model strings).
    children
        Fitted sub-heads by name (ensembles).
    """

    kind: str
    params: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    children: dict[str, HeadState] = field(default_factory=dict)


def jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and tuples as plain JSON types."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


class Head(RegressorMixin, BaseEstimator):
    """Base class of the per-gene heads.

    Subclasses set :attr:`kind`, implement ``fit``/``predict`` and the two
    state hooks :meth:`_export` and :meth:`_restore`.
    """

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            HEADS[cls.kind] = cls

    def __sklearn_tags__(self):
        # Every head predicts many genes at once, and one gene from a 1-D y.
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    # ------------------------------------------------------------------ data
    def _fit_data(self, X, Y, groups=None, min_samples: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Validated ``X``, targets as 2-D float64 and ``groups`` checked against ``X``.

        Records ``y_ndim_`` so that :meth:`_as_fitted_shape` returns 1-D
        predictions for a head fitted on a 1-D ``y``.
        """
        from sklearn.utils.validation import validate_data

        X, Y = validate_data(
            self, X, Y, multi_output=True, y_numeric=True, dtype=[np.float64, np.float32], ensure_min_samples=min_samples
        )
        Y = np.asarray(Y, dtype=np.float64)
        self.y_ndim_ = Y.ndim
        if groups is not None:
            groups = np.asarray(groups)
            if len(groups) != len(X):
                raise ValueError(f"groups has {len(groups)} entries for {len(X)} samples")
        return X, Y.reshape(len(Y), -1), groups

    def _as_fitted_shape(self, predictions: np.ndarray) -> np.ndarray:
        """``(n_spots,)`` when fitted on a 1-D ``y``, else ``(n_spots, n_targets)``."""
        return predictions[:, 0] if self.y_ndim_ == 1 else predictions

    # ------------------------------------------------------------------ state
    def get_state(self) -> HeadState:
        """The fitted head as a :class:`HeadState` (raises if not fitted)."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        meta, arrays, texts, children = self._export()
        return HeadState(
            kind=self.kind,
            params=jsonable(self.get_params(deep=False)),
            meta=jsonable(meta),
            arrays={k: np.ascontiguousarray(v) for k, v in arrays.items()},
            texts=dict(texts),
            children={k: c.get_state() for k, c in children.items()},
        )

    @classmethod
    def from_state(cls, state: HeadState) -> Head:
        """Rebuild a fitted head of the class registered as ``state.kind``."""
        head_cls = head_class(state.kind)
        head = head_cls(**state.params)
        children = {k: Head.from_state(c) for k, c in state.children.items()}
        head._restore(state.meta, state.arrays, state.texts, children)
        return head

    def _export(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str], dict[str, Head]]:
        """Return ``(meta, arrays, texts, children)`` describing the fitted head."""
        raise NotImplementedError

    def _restore(
        self, meta: dict[str, Any], arrays: dict[str, np.ndarray], texts: dict[str, str], children: dict[str, Head]
    ) -> None:
        """Set the fitted attributes from what :meth:`_export` returned."""
        raise NotImplementedError


def head_class(kind: str) -> type[Head]:
    """The head class registered as ``kind``; one-line error for unknown kinds."""
    import virtualst.heads  # noqa: F401  (imports every head module, filling HEADS)

    try:
        return HEADS[kind]
    except KeyError:
        raise ValueError(f"unknown head {kind!r}; known: {', '.join(sorted(HEADS))}") from None


def make_head(kind: str, **params: Any) -> Head:
    """A new, unfitted head of ``kind`` with ``params``."""
    return head_class(kind)(**params)
