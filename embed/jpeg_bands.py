"""Decode only the rows of a JPEG that tiles need, bit-identical to a full decode.

A baseline JPEG is one stream of entropy-coded MCUs (minimum coded units,
8 or 16 px squares), so a plain decoder must decode every row above the last
one it wants. With restart markers (a DRI segment) the stream is cut into
intervals that decode independently: the DC predictors reset at each marker.
Scanners and Photoshop commonly write one interval per MCU row (her2st: 580
MCUs, one 16 px row of a 9,274 px wide image). A band of rows is then a small
JPEG of its own: the original headers with the band's height in the frame
header, the band's intervals with their markers renumbered, and an EOI.

libjpeg's smooth chroma upsampling reads one chroma row across each edge of a
band, so every band is decoded with one extra unit of rows above and below,
which is dropped: the rows kept equal a full decode's bit for bit (tested on
generated files and on her2st). Tiles at spots need a fraction of the rows
(her2st: about 40 %), and the decode time and memory shrink with it.

:func:`restart_layout` returns ``None`` where this does not apply
(progressive or arithmetic-coded files, no restart markers, intervals that
do not end at row boundaries, a marker count that does not add up); callers
then decode the whole image.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import numpy as np

#: Frame types whose single scan can be cut at restart markers: baseline and
#: extended sequential Huffman (progressive and arithmetic-coded files cannot).
_SEQUENTIAL_FRAMES = {0xC0, 0xC1}
_DRI, _SOS, _EOI = 0xDD, 0xDA, 0xD9
#: Any marker inside entropy-coded data (0xFF00 is a stuffed byte, 0xFFFF fill).
_MARKER = re.compile(rb"\xff([^\x00\xff])", re.DOTALL)


@dataclass(frozen=True)
class RestartLayout:
    """Where each band of rows of a JPEG lies in its file.

    Attributes
    ----------
    width, height
        Image size in pixels.
    unit_px
        Rows in one unit, the smallest band that starts and ends on restart
        markers (a whole number of MCU rows).
    header
        Every byte before the entropy-coded data (up to the end of SOS).
    height_at
        Offset in ``header`` of the frame header's 2-byte height.
    intervals
        ``(start, stop)`` byte range of each restart interval's data,
        markers excluded.
    intervals_per_unit
        Restart intervals in one unit.
    """

    width: int
    height: int
    unit_px: int
    header: bytes
    height_at: int
    intervals: tuple[tuple[int, int], ...]
    intervals_per_unit: int

    @property
    def n_units(self) -> int:
        return -(-self.height // self.unit_px)

    def band_stream(self, data: bytes, first: int, stop: int) -> bytes:
        """A JPEG of the rows of units ``[first, stop)`` (the last may be partial)."""
        rows = min(self.height, stop * self.unit_px) - first * self.unit_px
        header = bytearray(self.header)
        header[self.height_at : self.height_at + 2] = struct.pack(">H", rows)
        chosen = self.intervals[first * self.intervals_per_unit : stop * self.intervals_per_unit]
        parts = [bytes(header)]
        for k, (start, end) in enumerate(chosen):
            if k:
                parts.append(bytes((0xFF, 0xD0 + (k - 1) % 8)))  # markers count from RST0 in every stream
            parts.append(data[start:end])
        parts.append(b"\xff\xd9")
        return b"".join(parts)


def restart_layout(data: bytes) -> RestartLayout | None:
    """The band layout of a JPEG file's bytes, or ``None`` when bands cannot be cut."""
    header = _read_header(data)
    if header is None:
        return None
    width, height, height_at, mcu_w, mcu_h, interval, scan = header
    per_row = -(-width // mcu_w)
    mcu_rows = -(-height // mcu_h)
    if interval % per_row == 0:  # an interval spans whole MCU rows
        unit_px, intervals_per_unit = interval // per_row * mcu_h, 1
    elif per_row % interval == 0:  # several intervals make one MCU row
        unit_px, intervals_per_unit = mcu_h, per_row // interval
    else:
        return None
    intervals = _intervals(data, scan)
    if intervals is None or len(intervals) != -(-per_row * mcu_rows // interval):
        return None
    return RestartLayout(width, height, unit_px, data[:scan], height_at, intervals, intervals_per_unit)


def _read_header(data: bytes) -> tuple[int, int, int, int, int, int, int] | None:
    """``(width, height, height offset, MCU width, MCU height, restart interval, scan start)``."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, frame, interval = 2, None, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        body = data[pos + 4 : pos + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if marker not in _SEQUENTIAL_FRAMES or len(body) < 6:
                return None
            height, width, n_components = struct.unpack(">HHB", body[1:6])
            if height == 0 or len(body) < 6 + 3 * n_components:  # height 0: set later by a DNL marker
                return None
            sampling = [(body[7 + 3 * c] >> 4, body[7 + 3 * c] & 0x0F) for c in range(n_components)]
            frame = (width, height, pos + 5, n_components, sampling)
        elif marker == _DRI and len(body) >= 2:
            (interval,) = struct.unpack(">H", body[:2])
        elif marker == _SOS:
            if frame is None or interval == 0 or not body or body[0] != frame[3]:
                return None  # no restart markers, or a scan without every component
            width, height, height_at, n_components, sampling = frame
            if n_components == 1:  # a one-component scan is coded block by block
                mcu_w = mcu_h = 8
            else:
                mcu_w, mcu_h = 8 * max(h for h, _ in sampling), 8 * max(v for _, v in sampling)
            return width, height, height_at, mcu_w, mcu_h, interval, pos + 2 + length
        pos += 2 + length
    return None


def _intervals(data: bytes, scan: int) -> tuple[tuple[int, int], ...] | None:
    """Byte ranges of the restart intervals of the scan at ``scan``; ``None`` unless it ends at EOI."""
    intervals, start = [], scan
    for match in _MARKER.finditer(data, scan):
        marker = match.group(1)[0]
        if 0xD0 <= marker <= 0xD7:
            intervals.append((start, match.start()))
            start = match.end()
            continue
        if marker != _EOI:
            return None  # a second scan, DNL...: not one cuttable scan
        intervals.append((start, match.start()))
        return tuple(intervals)
    return None


class BandedJpeg:
    """Row reads from a JPEG with restart markers, each unit of rows decoded once, on first need.

    Parameters
    ----------
    data
        The file's bytes (held: bands are cut from them).
    layout
        Its :func:`restart_layout`.
    """

    def __init__(self, data: bytes, layout: RestartLayout) -> None:
        self.data = data
        self.layout = layout
        self._units: dict[int, np.ndarray] = {}

    @property
    def height(self) -> int:
        return self.layout.height

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of a region inside the image."""
        unit = self.layout.unit_px
        first, stop = y // unit, -(-(y + h) // unit)
        self._decode_missing(first, stop)
        parts = [
            self._units[u][max(y - u * unit, 0) : y + h - u * unit, x : x + w] for u in range(first, stop)
        ]
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def _decode_missing(self, first: int, stop: int) -> None:
        missing = [u for u in range(first, stop) if u not in self._units]
        while missing:
            run_end = 1
            while run_end < len(missing) and missing[run_end] == missing[0] + run_end:
                run_end += 1
            run, missing = missing[:run_end], missing[run_end:]
            # One unit of context on each side, decoded and dropped (chroma upsampling reads across).
            lo, hi = max(run[0] - 1, 0), min(run[-1] + 2, self.layout.n_units)
            band = decode_rgb(self.layout.band_stream(self.data, lo, hi))
            unit = self.layout.unit_px
            for u in run:
                self._units[u] = band[(u - lo) * unit : (u - lo + 1) * unit]


def decode_rgb(stream: bytes) -> np.ndarray:
    """A JPEG stream (a whole file or a band) as ``(h, w, 3)`` uint8 RGB, through simplejpeg."""
    import simplejpeg

    # strict=False: recoverable libjpeg warnings pass, as they do in PIL.
    return simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=False)
