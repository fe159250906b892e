"""Encoder speed on any device: model-only against the full pipeline, and FLOP utilisation.

Run ``python -m virtualst.bench.encoder_speed --encoder uni_v1 --random-weights``
(on a GPU box: ``--device cuda``). In one process it

1. generates a pyramidal TIFF slide with a Visium grid of about ``--spots``
   spots over its tissue (:mod:`virtualst.bench.predict_memory`'s slide; no
   data set needed, so it runs on a bare GPU machine);
2. times the encoder alone on a preprocessed batch already on the device
   (**model-only**: the ceiling);
3. times the whole pipeline (tile reads from the TIFF in DataLoader workers,
   pinned host memory, transfer, preprocessing, the encoder at its precision,
   HDF5 writes) into a fresh cache (**pipeline**);
4. counts the encoder's FLOPs per tile and reports the achieved TFLOP/s
   against the vendor's bf16 peak and a measured bf16 matrix product.

Random weights (``--random-weights``) run the real architectures of gated
models (UNI's ViT-L/16, H-optimus' ViT-g/14) at their real cost.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virtualst.bench.flops import flops_per_tile, measured_matmul_tflops, synchronize, vendor_bf16_peak_tflops
from virtualst.bench.predict_memory import ensure_slide, grid_sample
from virtualst.bench.timing import cpu_model
from virtualst.embed.extractor import FeatureExtractor
from virtualst.embed.runner import EmbedSettings, default_batch_size, default_workers, embed_with, resolve_device
from virtualst.sample import Sample


@dataclass
class EncoderSpeed:
    """What one run measured."""

    encoder: str
    device: str
    device_name: str
    precision: str
    batch_size: int
    workers: int
    compiled: bool
    tiles: int
    model_tiles_per_s: float
    pipeline_tiles_per_s: float
    ratio: float
    gflops_per_tile: float
    achieved_tflops: float
    vendor_peak_tflops: float | None
    measured_peak_tflops: float | None

    def lines(self) -> list[str]:
        """Human-readable report."""
        out = [
            f"device     {self.device_name} ({self.device}); {self.encoder} at {self.precision}, batch {self.batch_size}, "
            f"{self.workers} reading workers{', torch.compile' if self.compiled else ''}",
            f"model-only {self.model_tiles_per_s:9.1f} tiles/s",
            f"pipeline   {self.pipeline_tiles_per_s:9.1f} tiles/s over {self.tiles} tiles",
            f"ratio      {self.ratio:9.3f}  (target >= 0.8 on GPU, >= 0.9 on CPU)",
            f"FLOPs      {self.gflops_per_tile:9.1f} GFLOP/tile -> {self.achieved_tflops:.1f} TFLOP/s achieved by the model",
        ]
        for label, peak in (("vendor bf16 peak", self.vendor_peak_tflops), ("measured bf16 matmul", self.measured_peak_tflops)):
            if peak:
                out.append(f"           {self.achieved_tflops / peak:9.1%} of the {label} ({peak:.0f} TFLOP/s)")
        return out


def generated_sample(directory: Path, spots: int) -> Sample:
    """A generated pyramidal TIFF at 0.5 µm/px with about ``spots`` Visium-grid spots on its tissue."""
    slide, _ = ensure_slide(directory, spots)
    return grid_sample(slide)


def model_only_rate(extractor: FeatureExtractor, batch_size: int, tiles: int) -> float:
    """Tiles/s of the encoder on a preprocessed batch already on its device."""
    import torch

    encoder, device = extractor.encoder, extractor.device
    size = encoder.input_size
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    x = encoder.preprocess(x).contiguous(memory_format=torch.channels_last)
    batches = max(1, math.ceil(tiles / batch_size))
    with torch.inference_mode():
        extractor.forward(x)  # warm-up: kernel choice, compilation, allocator
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            extractor.forward(x)
        synchronize(device)
    return batches * batch_size / (time.perf_counter() - start)


def pipeline_rate(extractor: FeatureExtractor, sample: Sample, settings: EmbedSettings) -> float:
    """Tiles/s from the slide on disk to a finished cache (encoder already loaded and warm)."""
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        embed_with(extractor, [sample], cache, settings)
        elapsed = time.perf_counter() - start
    sample.image.close()  # the next run starts from the file again
    return sample.n_spots / elapsed


def measure(
    encoder: str = "efficientnet_lite0",
    device: str = "auto",
    spots: int = 2000,
    batch_size: int | None = None,
    workers: int | None = None,
    random_weights: bool = False,
    compile_encoder: bool = False,
    peak: bool = True,
    workdir: Path | None = None,
) -> EncoderSpeed:
    """Run the three measurements; see the module docstring."""
    import torch

    from virtualst.embed.encoders import load_encoder

    torch_device = resolve_device(device)
    extractor = FeatureExtractor(load_encoder(encoder, pretrained=not random_weights), torch_device, compile_encoder=compile_encoder)
    batch = batch_size or default_batch_size(torch_device)
    settings = EmbedSettings(encoder=encoder, batch_size=batch, num_workers=workers, device=str(torch_device))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        sample = generated_sample(Path(tmp), spots)
        model = model_only_rate(extractor, batch, sample.n_spots)
        pipeline_rate(extractor, sample, settings)  # warm-up: file cache, worker start-up paths
        pipeline = pipeline_rate(extractor, sample, settings)
    gflops = flops_per_tile(extractor.encoder, torch_device) / 1e9
    cuda = torch_device.type == "cuda"
    device_name = torch.cuda.get_device_name(torch_device) if cuda else cpu_model()
    return EncoderSpeed(
        encoder=encoder,
        device=str(torch_device),
        device_name=device_name,
        precision=extractor.encoder.precision if cuda else "fp32",
        batch_size=batch,
        workers=workers if workers is not None else default_workers(torch_device),
        compiled=compile_encoder,
        tiles=sample.n_spots,
        model_tiles_per_s=model,
        pipeline_tiles_per_s=pipeline,
        ratio=pipeline / model,
        gflops_per_tile=gflops,
        achieved_tflops=gflops * model / 1e3,
        vendor_peak_tflops=vendor_bf16_peak_tflops(device_name) if cuda else None,
        measured_peak_tflops=measured_matmul_tflops(torch_device) if cuda and peak else None,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; prints the report and returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--spots", type=int, default=2000, help="tiles in the pipeline run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--random-weights", action="store_true", help="real architecture, random weights (gated models)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-peak", action="store_true", help="skip the bf16 matmul peak measurement")
    args = parser.parse_args(argv)
    result = measure(
        args.encoder, args.device, args.spots, args.batch_size, args.workers, args.random_weights, args.compile, not args.no_peak
    )
    print("\n".join(result.lines()))
    return asdict(result)


if __name__ == "__main__":  # pragma: no cover
    main()
