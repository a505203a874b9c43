"""Video files, cameras and network streams as inputs (optional extra: ``pip install 'focus-detr[video]'``).

Decoding and encoding use PyAV (the ``av`` package): its wheels bundle FFmpeg (H.264 encoder included), so
one ``pip install`` reads every common container and codec, camera devices and RTSP/RTMP/HLS streams, and
writes an MP4 that browsers play. OpenCV would do the same job but is a larger wheel whose bundled FFmpeg
cannot write H.264, and frames would come back in BGR. PyAV is imported only when a video is actually
opened, so the rest of focus-detr never needs it.

Sources (:func:`open_video`):

* a video file (suffix in :data:`VIDEO_EXTENSIONS`, or any file FFmpeg can read);
* a stream URL: ``rtsp://``, ``rtsps://``, ``rtmp://``, ``udp://``, ``tcp://``, ``srt://``, or an
  ``http(s)://`` URL ending in ``.m3u8`` (HLS) -- read live, never downloaded;
* a camera: ``camera:N`` (Linux: ``/dev/videoN`` through v4l2; macOS: AVFoundation device ``N``) or a
  ``/dev/videoN`` path.

Example::

    from focus_detr.video import open_video, VideoWriter

    with open_video("clip.mp4") as video, VideoWriter("out.mp4", fps=video.fps) as writer:
        for frame in video:                 # frame.index, frame.time_s, frame.image ([H, W, 3] uint8 RGB)
            writer.write(frame.image)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .data.errors import DataError

#: File name endings treated as videos when searching folders.
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts", ".3gp"})

_STREAM_RE = re.compile(r"^(rtsps?|rtmps?|udp|tcp|srt)://|^https?://\S+\.m3u8(\?.*)?$", re.IGNORECASE)
_CAMERA_RE = re.compile(r"^camera:(\d+)$", re.IGNORECASE)
INSTALL_HINT = "video input needs PyAV: pip install 'focus-detr[video]'"


def is_video_file(path: str | os.PathLike[str]) -> bool:
    """True if the name ends in one of :data:`VIDEO_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_stream(text: object) -> bool:
    """True for live sources: stream URLs, ``camera:N`` and ``/dev/videoN``."""
    if not isinstance(text, str):
        return False
    text = text.strip()
    return bool(_STREAM_RE.match(text) or _CAMERA_RE.match(text) or re.match(r"^/dev/video\d+$", text))


def require_av() -> Any:
    """Import PyAV, or raise ``ImportError`` with the one-line install hint."""
    try:
        import av
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return av


@dataclass
class VideoFrame:
    """One decoded frame: ``index`` counts decoded frames from 0, ``time_s`` is its presentation time
    (None when the container has none), ``image`` is ``[H, W, 3]`` uint8 RGB."""

    index: int
    time_s: float | None
    image: np.ndarray


class VideoReader:
    """Frames of one video source, in order (use :func:`open_video`; a context manager and an iterable).

    Attributes: ``source`` (as given), ``name`` (a file name for outputs), ``fps`` (average frame rate, or
    None), ``frame_count`` (from the container header, None when unknown, e.g. streams), ``width``,
    ``height``, ``live`` (a stream or camera: endless until stopped).
    """

    def __init__(self, source: str | os.PathLike[str], timeout_s: float = 10.0) -> None:
        av = require_av()
        self.source = os.fspath(source)
        self.live = is_stream(self.source)
        file, fmt, options = _av_open_arguments(self.source)
        self.name = _output_name(self.source)
        try:
            self._container = av.open(file, format=fmt, options=options, timeout=timeout_s if self.live else None)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise DataError(f"cannot open video ({_ffmpeg_reason(e)})", self.source) from None
        if not self._container.streams.video:
            self._container.close()
            raise DataError("no video stream in this file", self.source)
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"  # frame/slice threads inside FFmpeg: faster decoding, same frames
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps: float | None = float(rate) if rate else None
        self.frame_count: int | None = int(self._stream.frames) or None
        self.width, self.height = int(self._stream.codec_context.width), int(self._stream.codec_context.height)

    def __iter__(self) -> Iterator[VideoFrame]:
        av = require_av()
        index = 0
        try:
            for frame in self._container.decode(self._stream):
                time_s = float(frame.time) if frame.time is not None else None
                yield VideoFrame(index, time_s, frame.to_ndarray(format="rgb24"))
                index += 1
        except av.error.FFmpegError as e:
            if index == 0:
                raise DataError(f"cannot decode video ({_ffmpeg_reason(e)})", self.source) from None
            # A truncated file or a dropped stream ends the video after the frames that did decode.
            print(f"warning: {self.source}: video ended early after {index} frame(s) ({_ffmpeg_reason(e)})",
                  file=sys.stderr)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(source: str | os.PathLike[str], timeout_s: float = 10.0) -> VideoReader:
    """Open a video file, stream URL or camera (see the module docstring) for reading.

    Raises:
        ImportError: PyAV is not installed (message: how to install it).
        DataError: naming ``source``: it cannot be opened or holds no video stream.
    """
    return VideoReader(source, timeout_s)


class VideoWriter:
    """Write RGB frames to a video file (H.264 in MP4 by default; MPEG-4 Part 2 if FFmpeg lacks libx264).

    The size is taken from the first frame; odd widths/heights are padded by one edge pixel (H.264 with
    4:2:0 chroma needs even sizes). Frames of another size are resized to the first one's.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float | None = None, quality: int = 23) -> None:
        self._av = require_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = fps if fps and fps > 0 else 25.0
        self.quality = quality
        self._container = None
        self._stream = None
        self.frames = 0

    def _start(self, height: int, width: int) -> None:
        av = self._av
        self._container = av.open(str(self.path), mode="w")
        rate = Fraction(self.fps).limit_denominator(1001)
        for codec in ("libx264", "mpeg4"):
            try:
                stream = self._container.add_stream(codec, rate=rate)
                break
            except (av.error.FFmpegError, ValueError):  # encoder missing from this FFmpeg build
                continue
        else:  # pragma: no cover - every PyAV wheel has mpeg4
            raise DataError("no H.264 or MPEG-4 encoder in this FFmpeg build", self.path)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": str(self.quality), "preset": "veryfast"}
        self._stream = stream

    def write(self, image: np.ndarray) -> None:
        """Append one ``[H, W, 3]`` uint8 RGB frame."""
        frame = np.ascontiguousarray(image, dtype=np.uint8)
        if self._stream is None:
            self._start(*frame.shape[:2])
        h, w = self._stream.height, self._stream.width
        if frame.shape[:2] != (h, w):
            if abs(frame.shape[0] - h) <= 1 and abs(frame.shape[1] - w) <= 1:
                frame = np.pad(frame, ((0, h - frame.shape[0]), (0, w - frame.shape[1]), (0, 0)), mode="edge")
            else:
                from PIL import Image

                frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))
        video_frame = self._av.VideoFrame.from_ndarray(frame, format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (safe to call twice)."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _av_open_arguments(source: str) -> tuple[str, str | None, dict[str, str]]:
    """``(file, format, options)`` for ``av.open``: cameras need their platform's capture format."""
    camera = _CAMERA_RE.match(source)
    if camera or re.match(r"^/dev/video\d+$", source):
        index = camera.group(1) if camera else source[len("/dev/video"):]
        if sys.platform.startswith("linux"):
            return f"/dev/video{index}", "v4l2", {}
        if sys.platform == "darwin":
            return index, "avfoundation", {"framerate": "30"}
        raise DataError("camera:N is supported on Linux and macOS; on Windows pass the camera as a stream "
                        "URL or record a file", source)
    if source.lower().startswith("rtsp"):
        return source, None, {"rtsp_transport": "tcp"}  # TCP: no lost packets, no smeared frames
    return source, None, {}


def _output_name(source: str) -> str:
    """A file-name-safe stem for the annotated video of ``source``."""
    camera = _CAMERA_RE.match(source)
    if camera:
        return f"camera{camera.group(1)}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.split("?")[0].rstrip("/")).name).strip("._")
    return stem or "stream"


def _ffmpeg_reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return str(text).strip().splitlines()[0][:200] if str(text).strip() else type(error).__name__
