"""The encoder forward pass: device, memory format, preprocessing, TTA, out-of-memory back-off."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from virtualst.errors import EncoderError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from virtualst.embed.encoders import Encoder

log = logging.getLogger(__name__)


def dihedral_views(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 rotations/flips of a (B, C, H, W) batch."""
    import torch

    for flipped in (x, torch.flip(x, dims=(3,))):
        for k in range(4):
            yield torch.rot90(flipped, k, dims=(2, 3))


@functools.cache  # process-wide setting: once is enough
def keep_freed_memory() -> None:
    """Stop glibc from returning freed activations to the OS after every batch.

    By default large blocks are mmap'ed and unmapped on free, so each forward
    pass page-faults its activations back in: measured on 2 cores, half the
    CPU time went to the kernel and EfficientNet-Lite0 ran at ~100 instead of
    ~240 tiles/s. Raising the mmap and trim thresholds keeps the memory for
    reuse. A no-op where glibc's ``mallopt`` is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 512 * 2**20)
    libc.mallopt(m_trim_threshold, 1024 * 2**20)


class FeatureExtractor:
    """Device placement, preprocessing, memory format, TTA and batch back-off around an encoder.

    Parameters
    ----------
    encoder
        The frozen encoder.
    device
        Where it runs.
    tta
        Average features over the 8 dihedral transforms.
    compile_encoder
        Run the encoder through ``torch.compile`` (worth it for long GPU runs:
        the first batches pay the compilation).
    max_batch
        Most tiles per forward pass; larger batches are split. Halved (and the
        batch retried) whenever the device runs out of memory, so a batch size
        too large for the GPU slows the first batch instead of failing the run.

    Attributes
    ----------
    forward
        The encoder's forward pass on a preprocessed batch (compiled when asked).
    """

    def __init__(
        self, encoder: Encoder, device: torch.device, tta: bool = False, compile_encoder: bool = False, max_batch: int | None = None
    ) -> None:
        import torch

        keep_freed_memory()
        self.device = device
        self.tta = tta
        self.max_batch = max_batch
        # channels_last doubles CPU throughput of the convolutional encoders (oneDNN) and helps on GPU.
        self.encoder = encoder.to(device, memory_format=torch.channels_last).eval()
        self.forward = torch.compile(self.encoder) if compile_encoder else self.encoder

    def __call__(self, tiles_bhwc: torch.Tensor) -> np.ndarray:
        """Features (B, D) float32 for a uint8 (B, H, W, 3) batch."""
        import torch

        done: list[np.ndarray] = []
        start = 0
        while start < len(tiles_bhwc) or not done:
            chunk = tiles_bhwc[start : start + (self.max_batch or len(tiles_bhwc))]
            try:
                done.append(self._features(chunk))
            except torch.OutOfMemoryError:
                failed = len(chunk)  # back off outside the handler: its traceback pins the batch's tensors
            else:
                start += len(chunk)
                continue
            self._back_off(failed)
        return done[0] if len(done) == 1 else np.concatenate(done)

    def _back_off(self, failed: int) -> None:
        """Halve the batch after an out-of-memory error; give up below one tile."""
        import torch

        if failed <= 1:
            raise EncoderError(f"{self.encoder.config.name}: out of memory on {self.device} with a single tile; try --device cpu")
        self.max_batch = failed // 2
        log.warning(
            "%s: out of memory on %s at %d tiles per batch; continuing with %d",
            self.encoder.config.name, self.device, failed, self.max_batch,
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _features(self, tiles_bhwc: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = tiles_bhwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = self.encoder.preprocess(x).contiguous(memory_format=torch.channels_last)
            # The encoder applies its own precision (autocast) on CUDA.
            if self.tta:
                features = torch.stack([self.forward(view) for view in dihedral_views(x)]).mean(0)
            else:
                features = self.forward(x)
            return features.float().cpu().numpy()
