"""``GenePredictor``: cached embeddings in, gene expression out, saved without pickle.

It bundles the encoder's identity (so predictions are never made from the
wrong embeddings), the target spec, the head, and the optional spatial
context and prediction smoothing. ``fit`` also measures per-gene Pearson
on held-out sections (group k-fold by patient, or by section when there is
one patient), which the saved config, the model card and the gene maps
carry so users can see which genes the model can predict.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from virtualst._version import __version__
from virtualst.anndata_io import spatial_uns
from virtualst.embed.cache import Embeddings, read_embeddings
from virtualst.errors import InputError
from virtualst.heads.base import Head, make_head
from virtualst.heads.cv import pearson_per_gene
from virtualst.heads.persistence import arrays_of, flatten_state, read_model_dir, unflatten_state, write_model_dir
from virtualst.heads.smoothing import FeatureContext, PredictionSmoother
from virtualst.heads.targets import TargetSpec

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from virtualst.sample import Sample

#: Genes whose cross-validated Pearson is below this are flagged unreliable.
DEFAULT_RELIABLE_PEARSON = 0.1


@dataclass
class Section:
    """One sample's spots with embeddings: what the heads train and predict on."""

    sample_id: str
    group: str
    barcodes: np.ndarray
    features: np.ndarray
    coords_px: np.ndarray  # spot centres, level-0 pixels
    um_per_px: float
    sample: Sample | None = None

    @property
    def coords_um(self) -> np.ndarray:
        return self.coords_px * self.um_per_px


def _embeddings(cache: str | Path | Embeddings) -> Embeddings:
    return cache if isinstance(cache, Embeddings) else read_embeddings(cache)


def encoder_identity(emb: Embeddings) -> dict[str, Any]:
    """What must match between the training caches and a cache to predict on."""
    attrs = emb.attrs
    where = emb.path or "embeddings"
    for key in ("encoder", "tile_um", "tile_px"):
        if key not in attrs:
            raise InputError(where, f"cache has no {key!r} attribute; embed it with `virtualst embed`")
    run = json.loads(attrs["settings"]) if "settings" in attrs else {}
    return {
        "name": str(attrs["encoder"]),
        "tta": bool(run.get("tta", False)),  # features averaged over the 8 dihedral transforms differ
        "weights_source": str(attrs.get("weights_source", "")),
        "weights_revision": str(attrs.get("weights_revision", "")),
        "weights_sha256": str(attrs.get("weights_sha256", "")),
        "tile_um": float(attrs["tile_um"]),
        "tile_px": int(attrs["tile_px"]),
        "dim": int(emb.features.shape[1]),
    }


def _same_encoder(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    a, b = {"tta": False, **a}, {"tta": False, **b}  # models saved before TTA was recorded were fitted without it
    keys = ("name", "weights_sha256", "weights_revision", "tile_px", "dim", "tta")
    diffs = [f"{k} {b.get(k)!r} vs {a.get(k)!r}" for k in keys if str(a.get(k)) != str(b.get(k))]
    if not np.isclose(a["tile_um"], b["tile_um"], rtol=1e-3):
        diffs.append(f"tile_um {b['tile_um']} vs {a['tile_um']}")
    return diffs


def section_from(cache: str | Path | Embeddings, sample: Sample | None = None) -> Section:
    """Align a cache with its sample's spots (sample order; spots missing from the cache are dropped)."""
    emb = _embeddings(cache)
    where = emb.path or "embeddings"
    if sample is None:
        um_per_px = float(emb.attrs.get("um_per_px", 0) or 0)
        if um_per_px <= 0:
            raise InputError(where, "cache has no um_per_px attribute; pass the sample too")
        size0 = float(emb.attrs["tile_um"]) / um_per_px
        sample_id = str(emb.attrs.get("sample_id") or Path(str(where)).stem)
        group = str(emb.attrs.get("patient_id") or sample_id)
        return Section(sample_id, group, emb.barcodes, emb.features, emb.coords + size0 / 2, um_per_px)
    row = {b: i for i, b in enumerate(emb.barcodes)}
    barcodes = sample.barcodes
    keep = np.array([b in row for b in barcodes])
    if not keep.any():
        raise InputError(where, f"no barcode of sample {sample.sample_id!r} is in this cache")
    if not keep.all():
        warnings.warn(f"{where}: {int((~keep).sum())} spot(s) of {sample.sample_id} are not in the cache; skipped", stacklevel=2)
        sample = sample.subset(keep)
        barcodes = sample.barcodes
    features = emb.features[[row[b] for b in barcodes]]
    group = sample.patient_id or sample.sample_id
    return Section(sample.sample_id, str(group), barcodes, features, sample.centers, sample.um_per_px, sample)


class GenePredictor:
    """Predict spot-level gene expression from cached tile embeddings.

    Parameters
    ----------
    head
        Head kind (``"ridge"``, ``"lgbm"``, ``"knn"``, ``"ensemble"``).
    head_params
        Parameters of the head.
    target
        Normalisation and gene spec; default ``log1p`` of 50 HVGs.
    context
        Append neighbour/global mean embeddings (:class:`FeatureContext`).
    smoothing
        Smooth predictions over the spot graph with strengths chosen on
        held-out sections (:class:`PredictionSmoother`); ``True`` for defaults.
    cv_splits
        Folds (by patient, else by section) for the held-out metrics.
    reliable_pearson
        Cross-validated Pearson below which a gene is flagged unreliable.

    Attributes
    ----------
    genes_ : list of str
    head_ : Head
    smoother_ : PredictionSmoother or None
    encoder_ : dict
        Encoder name, weights source/revision/sha256, tile µm and px, dim.
    cv_ : dict
        ``scheme``, ``folds``, ``pearson`` (per gene), ``mean_pearson``.
    training_ : dict
        Sections, patients and spot counts trained on.
    """

    def __init__(
        self,
        head: str = "ridge",
        head_params: dict[str, Any] | None = None,
        target: TargetSpec | None = None,
        context: FeatureContext | None = None,
        smoothing: PredictionSmoother | bool | None = None,
        cv_splits: int = 5,
        random_state: int = 0,
        reliable_pearson: float = DEFAULT_RELIABLE_PEARSON,
    ) -> None:
        self.head = head
        self.head_params = dict(head_params or {})
        self.target = target or TargetSpec()
        self.context = context
        self.smoothing = PredictionSmoother() if smoothing is True else (smoothing or None)
        self.cv_splits = cv_splits
        self.random_state = random_state
        self.reliable_pearson = reliable_pearson

    # ------------------------------------------------------------------- fitting
    def _features(self, section: Section) -> np.ndarray:
        if self.context is None:
            return section.features
        return self.context.transform(section.features, section.coords_um)

    def _new_head(self) -> Head:
        return make_head(self.head, **self.head_params)

    def fit(self, caches: Sequence[str | Path | Embeddings], samples: Sequence[Sample]) -> GenePredictor:
        """Fit on the embeddings of ``samples`` (same order); samples need counts."""
        if len(caches) != len(samples):
            raise ValueError(f"{len(caches)} caches for {len(samples)} samples")
        if not samples:
            raise ValueError("no samples to fit on")
        embeddings = [_embeddings(c) for c in caches]
        self.encoder_ = encoder_identity(embeddings[0])
        for emb in embeddings[1:]:
            diffs = _same_encoder(self.encoder_, encoder_identity(emb))
            if diffs:
                raise InputError(emb.path or "embeddings", f"made with another encoder/tiling than the first cache ({'; '.join(diffs)})")
        sections = [section_from(e, s) for e, s in zip(embeddings, samples)]
        self.genes_ = self.target.select_genes([s.sample for s in sections])
        targets = [self.target.targets(s.sample, self.genes_) for s in sections]
        features = [self._features(s) for s in sections]

        self.cv_, oof = self._cross_validate(sections, features, targets)
        self.smoother_ = None
        if self.smoothing is not None:
            if oof is None:
                raise InputError(sections[0].sample_id, "prediction smoothing needs at least two sections to choose its strength")
            self.smoother_ = copy.deepcopy(self.smoothing).fit(oof, targets, [s.coords_um for s in sections])
            self.cv_["pearson_smoothed"] = dict(zip(self.genes_, map(float, self.smoother_.cv_pearson_after_)))
            self.cv_["mean_pearson_smoothed"] = float(np.mean(self.smoother_.cv_pearson_after_))

        groups = np.concatenate([[s.group] * len(s.barcodes) for s in sections])
        self.head_ = self._new_head().fit(np.concatenate(features), np.concatenate(targets), groups=groups)
        self.training_ = {
            "sections": [s.sample_id for s in sections],
            "patients": sorted({s.group for s in sections}),
            "n_spots": int(sum(len(s.barcodes) for s in sections)),
            "sources": [str(s.sample.source or "") for s in sections],
        }
        return self

    def _cross_validate(self, sections, features, targets) -> tuple[dict[str, Any], list[np.ndarray] | None]:
        """Held-out Pearson per gene; returns (cv summary, out-of-fold predictions per section)."""
        groups = [s.group for s in sections]
        distinct = sorted(set(groups))
        by = "patient" if len(distinct) > 1 and any(s.sample and s.sample.patient_id for s in sections) else "section"
        if len(distinct) < 2:
            distinct, groups, by = [s.sample_id for s in sections], [s.sample_id for s in sections], "section"
        if len(distinct) < 2:
            return {"scheme": "none (one section)", "folds": 0}, None
        n_folds = min(self.cv_splits, len(distinct))
        fold_of = {g: i % n_folds for i, g in enumerate(distinct)}
        oof: list[np.ndarray | None] = [None] * len(sections)
        for fold in range(n_folds):
            test = [i for i, g in enumerate(groups) if fold_of[g] == fold]
            train = [i for i in range(len(sections)) if i not in test]
            head = self._new_head().fit(
                np.concatenate([features[i] for i in train]),
                np.concatenate([targets[i] for i in train]),
                groups=np.concatenate([[groups[i]] * len(features[i]) for i in train]),
            )
            for i in test:
                oof[i] = head.predict(features[i]).reshape(len(features[i]), -1)
        pearson = pearson_per_gene(np.concatenate(targets), np.concatenate(oof))
        scheme = f"group {n_folds}-fold by {by}" + (" (not patient-disjoint)" if by == "section" else "")
        summary = {
            "scheme": scheme,
            "folds": n_folds,
            "pearson": dict(zip(self.genes_, map(float, pearson))),
            "mean_pearson": float(np.mean(pearson)),
        }
        return summary, oof

    # ---------------------------------------------------------------- prediction
    def predict(self, cache: str | Path | Embeddings, sample: Sample | None = None) -> ad.AnnData:
        """Predicted expression (spots x genes) as AnnData.

        ``obsm['spatial']`` holds spot centres in level-0 pixels; with a
        ``sample`` that has an image, ``uns['spatial']`` carries its
        thumbnail and scale factors, and measured counts (when present) are
        normalised like the targets into ``layers['measured']``.
        """
        import anndata as ad
        import pandas as pd

        emb = _embeddings(cache)
        diffs = _same_encoder(self.encoder_, encoder_identity(emb))
        if diffs:
            raise InputError(emb.path or "embeddings", f"embedded with another encoder/tiling than this model ({'; '.join(diffs)})")
        section = section_from(emb, sample)
        values = self.head_.predict(self._features(section)).reshape(len(section.barcodes), -1)
        if self.smoother_ is not None:
            values = self.smoother_.transform(values, section.coords_um)
        pearson = self.cv_.get("pearson_smoothed" if self.smoother_ is not None else "pearson", {})
        var = pd.DataFrame(index=pd.Index(self.genes_, dtype=object))
        var["cv_pearson"] = [pearson.get(g, np.nan) for g in self.genes_]
        var["reliable"] = var["cv_pearson"].to_numpy() >= self.reliable_pearson
        obs = pd.DataFrame(index=pd.Index(section.barcodes.astype(str), dtype=object))
        adata = ad.AnnData(X=values.astype(np.float32), obs=obs, var=var)
        adata.obsm["spatial"] = section.coords_px.astype(np.float64)
        adata.uns["virtualst"] = {
            "sample_id": section.sample_id,
            "um_per_px": section.um_per_px,
            "encoder": self.encoder_["name"],
            "normalization": self.target.normalization,
            "reliable_pearson": self.reliable_pearson,
            "version": __version__,
        }
        s = section.sample
        if s is not None and s.image is not None:
            adata.uns["spatial"] = {s.sample_id: spatial_uns(s)}
        if s is not None and s.counts is not None and set(self.genes_) <= set(map(str, s.genes)):
            adata.layers["measured"] = self.target.targets(s, self.genes_).astype(np.float32)
        return adata

    # --------------------------------------------------------------- persistence
    def to_config(self) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, str]]:
        """``(config, arrays by safetensors file, texts)`` describing the fitted predictor."""
        head_spec, head_arrays, texts = flatten_state(self.head_.get_state())
        smoothing, smoother_arrays = None, {}
        if self.smoother_ is not None:
            smoothing, smoother_arrays = self.smoother_.export()
        config = {
            "library": "virtualst",
            "library_version": __version__,
            "encoder": self.encoder_,
            "target": {
                "normalization": self.target.normalization,
                "gene_spec": str(self.target.genes) if isinstance(self.target.genes, str) else "list",
                "genes": list(self.genes_),
            },
            "head": head_spec,
            "context": None if self.context is None else self.context.to_dict(),
            "smoothing": smoothing,
            "cv": self.cv_,
            "training": self.training_,
            "reliable_pearson": self.reliable_pearson,
            "cv_splits": self.cv_splits,
            "random_state": self.random_state,
        }
        return config, {"head.safetensors": head_arrays, "smoothing.safetensors": smoother_arrays}, texts

    def save_pretrained(self, out_dir: str | Path, card_info: dict[str, Any] | None = None) -> Path:
        """Write ``config.json``, safetensors, text models and a model card to ``out_dir``.

        ``card_info`` adds card metadata: ``repo_id``, ``license``, ``datasets``,
        ``dataset_name``, ``description``.
        """
        from virtualst.cards import render_model_card

        config, arrays, texts = self.to_config()
        card = render_model_card(config, **(card_info or {}))
        return write_model_dir(out_dir, config, arrays, texts, card)

    @classmethod
    def from_pretrained(cls, dir_or_repo_id: str | Path, revision: str | None = None, token: str | None = None) -> GenePredictor:
        """Load a saved predictor from a directory or a Hub repository (verifying every checksum)."""
        from virtualst.heads.hub import resolve_model_dir

        folder = resolve_model_dir(dir_or_repo_id, revision=revision, token=token)
        config, arrays, texts = read_model_dir(folder)
        if config.get("library") != "virtualst":
            raise InputError(folder, "config.json was not written by virtualst")
        target = config["target"]
        spec = target["gene_spec"] if target["gene_spec"] != "list" else tuple(target["genes"])
        predictor = cls(
            head=config["head"]["kind"],
            head_params=config["head"]["params"],
            target=TargetSpec(normalization=target["normalization"], genes=spec),
            context=None if config["context"] is None else FeatureContext.from_dict(config["context"]),
            cv_splits=config.get("cv_splits", 5),
            random_state=config.get("random_state", 0),
            reliable_pearson=config.get("reliable_pearson", DEFAULT_RELIABLE_PEARSON),
        )
        predictor.genes_ = list(target["genes"])
        predictor.encoder_ = config["encoder"]
        predictor.cv_ = config["cv"]
        predictor.training_ = config["training"]
        predictor.head_ = Head.from_state(unflatten_state(config["head"], arrays_of(arrays, "head"), texts))
        predictor.smoother_ = None
        if config["smoothing"] is not None:
            predictor.smoother_ = PredictionSmoother.restore(config["smoothing"], arrays_of(arrays, "smoothing"))
            predictor.smoothing = predictor.smoother_
        predictor.source_ = str(folder)
        return predictor

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        card_info: dict[str, Any] | None = None,
    ) -> str:
        """Save to a temporary directory and upload it to ``repo_id``; returns the commit URL."""
        import tempfile

        from virtualst.heads.hub import push_model_dir

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", {"repo_id": repo_id, **(card_info or {})})
            return push_model_dir(folder, repo_id, private=private, revision=revision, token=token)

    def __repr__(self) -> str:
        fitted = f", {len(self.genes_)} genes" if hasattr(self, "genes_") else ""
        return f"GenePredictor(head={self.head!r}, target={self.target}{fitted})"
