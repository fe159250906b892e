"""Model-card templates, packaged as data, and their rendering."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

TAGS = ["virtualst", "spatial-transcriptomics", "histopathology", "gene-expression"]


def base_model_of(weights_source: str) -> str | None:
    """The Hub id of an encoder's weights (``hf-hub:org/name``, ``timm:tag``), else ``None``."""
    if weights_source.startswith("hf-hub:"):
        return weights_source.removeprefix("hf-hub:")
    if weights_source.startswith("timm:"):
        return f"timm/{weights_source.removeprefix('timm:')}"
    return None


def card_metadata(config: dict[str, Any], repo_id: str | None, license: str, datasets: list[str] | None, dataset_name: str | None) -> dict:
    """The YAML front matter: library, tags, base model, datasets, licence and model-index results."""
    meta: dict[str, Any] = {"library_name": "virtualst", "tags": list(TAGS), "license": license}
    base = base_model_of(config["encoder"].get("weights_source", ""))
    if base:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = list(datasets)
    cv = config.get("cv", {})
    if cv.get("folds"):
        metrics = [{"type": "pearsonr", "value": round(cv["mean_pearson"], 4), "name": f"Mean Pearson r over genes ({cv['scheme']})"}]
        if "mean_pearson_smoothed" in cv:
            metrics.append({"type": "pearsonr", "value": round(cv["mean_pearson_smoothed"], 4), "name": "Mean Pearson r, smoothed"})
        name = dataset_name or ", ".join(config["training"]["sections"])
        meta["model-index"] = [
            {
                "name": (repo_id or "virtualst-model").split("/")[-1],
                "results": [
                    {
                        "task": {"type": "spatial-gene-expression", "name": "Spot-level gene expression from H&E"},
                        "dataset": {"name": name, "type": (datasets or [name])[0]},
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return meta


def render_model_card(
    config: dict[str, Any],
    repo_id: str | None = None,
    license: str = "other",
    datasets: list[str] | None = None,
    dataset_name: str | None = None,
    description: str | None = None,
) -> str:
    """Render ``model_card.md`` for a saved predictor's ``config``."""
    import jinja2

    cv = config.get("cv", {})
    pearson = cv.get("pearson_smoothed") or cv.get("pearson") or {}
    training = config["training"]
    encoder = config["encoder"]
    front = yaml.safe_dump(card_metadata(config, repo_id, license, datasets, dataset_name), sort_keys=False, allow_unicode=True)
    template = resources.files(__name__).joinpath("model_card.md").read_text()
    env = jinja2.Environment(autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(
        front_matter=f"---\n{front}---",
        title=(repo_id or "virtualst model").split("/")[-1],
        description=description or "Virtual spatial transcriptomics: gene expression predicted from an H&E image.",
        normalization=config["target"]["normalization"],
        n_genes=len(config["target"]["genes"]),
        tile_um=round(encoder["tile_um"], 2),
        tile_px=encoder["tile_px"],
        encoder=encoder["name"],
        base_model=base_model_of(encoder.get("weights_source", "")),
        head=config["head"]["kind"],
        context=config.get("context"),
        smoothing=config.get("smoothing"),
        repo_id=repo_id,
        n_sections=len(training["sections"]),
        n_patients=len(training["patients"]),
        n_spots=training["n_spots"],
        sections=", ".join(training["sections"]),
        dataset_name=dataset_name,
        folds=cv.get("folds", 0),
        cv_scheme=cv.get("scheme", ""),
        mean_pearson=cv.get("mean_pearson", 0.0),
        mean_pearson_smoothed=cv.get("mean_pearson_smoothed"),
        reliable_pearson=config.get("reliable_pearson"),
        n_unreliable=sum(r < config.get("reliable_pearson", 0) for r in pearson.values()),
        top_genes=sorted(pearson.items(), key=lambda kv: -kv[1])[:20],
        version=config["library_version"],
    )
