"""Inference helpers shared by the ``focus-detr`` commands and the Python API.

* :func:`discover_images` turns files, folders (searched recursively) and glob patterns into a list of
  image paths, reporting arguments that match nothing; :func:`discover_inputs` also finds videos and keeps
  http(s) URLs and camera / stream sources;
* :func:`load_model` builds a model from any weights source (:mod:`focus_detr.weights`: our weights file,
  training checkpoint, official checkpoint or zip, Hugging Face folder, pretrained name), or a preset with
  random weights (smoke tests, demos);
* :func:`predict_images` runs batched prediction over paths, skipping (and reporting) unreadable files;
* :func:`predict_to_folder` does that (and downloads URLs, reads videos and streams) and writes annotated
  pictures / videos plus COCO-format results; :func:`predict_video` yields the detections of video frames;
* :func:`explain` gives the Focus-DETR explanation figure, its arrays and the detections for one image.

Example::

    import focus_detr
    from focus_detr.inference import explain, predict_to_folder

    model = focus_detr.load("weights.pt")
    summary = predict_to_folder(model, ["photos/"], "out/", batch_size=4, score_threshold=0.3)
    print(summary.num_images, "images,", len(summary.failures), "failed")
    figure, arrays, detections = explain(model, "photos/cat.jpg")
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .devices import resolve_device  # re-exported: focus_detr.inference.resolve_device
from .model import Detections, FocusDETR

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .video import VideoFrame, VideoReader

#: File name endings treated as images when searching folders (files named explicitly are always tried).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"})

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputProblem:
    """An input that produced no result: ``path`` (file, folder or pattern as given) and ``reason``."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --------------------------------------------------------------------------------------------------
# Input discovery


def discover_images(inputs: Iterable[str | os.PathLike[str]], recursive: bool = True,
                    extensions: Iterable[str] = IMAGE_EXTENSIONS) -> tuple[list[Path], list[InputProblem]]:
    """Expand files, folders and glob patterns into image paths (first occurrence order, no duplicates).

    * a file is taken as it is, whatever its name (it is an error later if it does not decode);
    * a folder contributes every file below it (``recursive``) whose suffix is in ``extensions``
      (case-insensitive), hidden files and folders excluded, in sorted order;
    * a pattern containing ``*``, ``?`` or ``[`` is expanded with :func:`glob.glob` (``**`` allowed);
      matching folders are searched as above.

    Returns ``(paths, problems)``; ``problems`` names arguments that do not exist or match no image.
    """
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    found: list[Path] = []
    seen: set[Path] = set()
    problems: list[InputProblem] = []

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(path)

    def add_folder(folder: Path, label: str) -> int:
        matched = 0
        walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
        for root, dirs, files in walker:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # prune hidden folders, sorted walk
            for name in sorted(files):
                if not name.startswith(".") and Path(name).suffix.lower() in exts and (Path(root) / name).is_file():
                    add(Path(root) / name)
                    matched += 1
        if not matched:
            problems.append(InputProblem(label, f"no image files ({', '.join(sorted(exts))}) in this folder"))
        return matched

    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            add_folder(path, text)
        elif path.is_file():
            add(path)
        elif _GLOB_CHARS & set(text):
            matched = 0
            for match in sorted(glob.glob(text, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    matched += add_folder(m, match)
                elif m.is_file() and (m.suffix.lower() in exts):
                    add(m)
                    matched += 1
            if not matched:
                problems.append(InputProblem(text, "the pattern matches no image file"))
        else:
            problems.append(InputProblem(text, "no such file or folder"))
    return found, problems


@dataclass(frozen=True)
class InputItem:
    """One input to predict on: ``kind`` is ``"image"`` (a local file), ``"video"`` (a local video file),
    ``"url"`` (http(s), downloaded first; image or video by its name) or ``"stream"`` (camera / stream URL,
    read live). ``source`` is a ``Path`` for local files and the text as given otherwise."""

    kind: str
    source: Path | str


def discover_inputs(inputs: Iterable[str | os.PathLike[str]], recursive: bool = True,
                    extensions: Iterable[str] = IMAGE_EXTENSIONS,
                    video_extensions: Iterable[str] | None = None) -> tuple[list[InputItem], list[InputProblem]]:
    """Like :func:`discover_images`, but also finds videos (in folders, by ``video_extensions``, default
    :data:`focus_detr.video.VIDEO_EXTENSIONS`), and keeps http(s) URLs and camera / stream sources
    (``rtsp://...``, ``camera:0``) as they are. URLs are recognised before any ``Path`` conversion (which
    would collapse their ``//``). Returns ``(items, problems)`` in first-occurrence order."""
    from .data.url_io import is_url
    from .video import VIDEO_EXTENSIONS, is_stream

    video_exts = {e.lower() if e.startswith(".") else "." + e.lower()
                  for e in (VIDEO_EXTENSIONS if video_extensions is None else video_extensions)}
    exts = set(extensions) | video_exts
    items: list[InputItem] = []
    problems: list[InputProblem] = []
    seen: set[Path | str] = set()
    for item in inputs:
        text = os.fspath(item)
        if isinstance(item, str) and (is_stream(text) or is_url(text)):
            found = [InputItem("stream" if is_stream(text) else "url", text.strip())]
        else:
            paths, trouble = discover_images([item], recursive, exts)
            problems.extend(InputProblem(t.path, "no image or video files in this folder")
                            if t.reason.startswith("no image files") else t for t in trouble)
            found = [InputItem("video" if p.suffix.lower() in video_exts else "image", p) for p in paths]
        for it in found:
            key = it.source.resolve() if isinstance(it.source, Path) else it.source
            if key not in seen:
                seen.add(key)
                items.append(it)
    return items, problems


# --------------------------------------------------------------------------------------------------
# Models


def load_model(weights: str | os.PathLike[str] | None = None, preset: str | None = None, random_init: bool = False,
               device: str | torch.device = "cpu", seed: int = 0, ema: bool = False,
               progress: bool = True) -> tuple[FocusDETR, str]:
    """Build the model to run and a one-line description of where its weights came from.

    * ``weights``: any weights source :mod:`focus_detr.weights.kinds` reads (our weights file, training
      checkpoint (``ema``: its EMA weights), official checkpoint or release zip (``preset``, else guessed from
      its keys), Hugging Face folder, pretrained name such as ``focus_detr_r50_4scale_36ep``);
    * ``preset`` and ``random_init`` (no ``weights``): randomly initialised weights from ``seed``
      (for smoke tests and demos: its detections are meaningless);
    * ``progress``: the download progress bar of a pretrained name (``--quiet`` turns it off).
    """
    from .model import build_model
    from .weights.kinds import load_model as load_any

    dev = resolve_device(device)
    if random_init:
        if weights is not None:
            raise ValueError("give either a weights file or --random-init, not both")
        if preset is None:
            raise ValueError("--random-init needs --preset (e.g. --preset tiny)")
        torch.manual_seed(seed)
        return build_model(preset).to(dev).eval(), f"preset {preset!r} with random weights (seed {seed})"
    if weights is None:
        raise ValueError("no weights given: pass a weights file or pretrained name, or --preset NAME --random-init")
    return load_any(weights, preset, ema, dev, progress=progress)


# --------------------------------------------------------------------------------------------------
# Prediction


@dataclass
class ImageResult:
    """The outcome for one input image.

    ``image_id`` is the 1-based position among the discovered inputs (stable whether or not other inputs
    fail); ``height`` / ``width`` are the original image's; ``detections`` is None when ``error`` is set.
    """

    path: Path
    image_id: int
    height: int = 0
    width: int = 0
    detections: Detections | None = None
    error: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)  # [H, W, 3] uint8, kept only when asked


def predict_images(model: FocusDETR, paths: Sequence[str | os.PathLike[str]], batch_size: int = 1,
                   score_threshold: float = 0.0, max_detections: int | None = None, keep_images: bool = False,
                   progress: bool = False) -> Iterator[ImageResult]:
    """Yield one :class:`ImageResult` per path, in order; unreadable files give a result with ``error``.

    Images are decoded with :func:`focus_detr.data.image_io.load_image` (any pixel format, EXIF orientation) and
    run through :meth:`FocusDETR.predict` ``batch_size`` at a time; boxes are in original-image pixels.
    """
    from .data.errors import DataError
    from .data.image_io import load_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = _progress(len(paths), "predict", "img", progress)
    pending: list[ImageResult] = []

    def flush() -> Iterator[ImageResult]:
        ready = [r for r in pending if r.error is None]
        if ready:
            arrays = [r.image for r in ready]
            detections = model.predict(arrays, score_threshold=score_threshold, max_detections=max_detections,
                                       batch_size=len(arrays))
            for r, det in zip(ready, detections):
                r.detections = _to_cpu(det)
        for r in pending:
            if not keep_images:
                r.image = None
            yield r
        bar.update(len(pending))
        pending.clear()

    try:
        for index, p in enumerate(paths, start=1):
            path = Path(p)
            result = ImageResult(path=path, image_id=index)
            try:
                array = load_image(path)
                result.image = array
                result.height, result.width = int(array.shape[0]), int(array.shape[1])
            except DataError as e:
                result.error = e.reason
            pending.append(result)
            if sum(r.error is None for r in pending) >= batch_size:
                yield from flush()
        yield from flush()
    finally:
        bar.close()


def _to_cpu(det: Detections) -> Detections:
    return Detections(det.boxes.cpu(), det.scores.cpu(), det.labels.cpu(), list(det.names), det.query_indices.cpu())


def _progress(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI, subprocess pipes).
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True, leave=False)


@dataclass
class PredictionSummary:
    """What :func:`predict_to_folder` did."""

    out_dir: Path
    results_file: Path
    images_file: Path
    num_images: int  # images processed successfully
    num_detections: int
    seconds: float
    pictures: list[Path] = field(default_factory=list)
    failures: list[InputProblem] = field(default_factory=list)  # unreadable files and inputs matching nothing
    interrupted_by: int | None = None  # the signal (SIGINT / SIGTERM) that stopped the run early, if any
    num_inputs: int = 0  # images found in the inputs (processed or not)
    videos: list["VideoSummary"] = field(default_factory=list)  # one per video / stream input processed

    @property
    def ok(self) -> bool:
        return not self.failures

    def error_summary(self) -> str:
        """One line per failed input (empty string when none failed)."""
        if not self.failures:
            return ""
        lines = [f"{len(self.failures)} input(s) failed:"]
        lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)


def category_mapping(class_names: Sequence[str] | None, annotations_file: str | os.PathLike[str] | None,
                     num_classes: int) -> tuple[dict[int, int] | None, list[dict[str, Any]]]:
    """Label -> COCO ``category_id`` and the categories list of the results.

    Without ``annotations_file`` the category id is the contiguous label itself. With it (a COCO annotation
    file, e.g. ``instances_val2017.json``), labels are matched to its categories *by name*, so the results
    can be scored against that file.
    """
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if annotations_file is None:
        return None, [{"id": i, "name": n} for i, n in enumerate(names)]
    try:
        data = json.loads(Path(annotations_file).read_text())
        categories = data["categories"]
        by_name = {str(c["name"]): int(c["id"]) for c in categories}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{annotations_file}: cannot read COCO categories ({type(e).__name__}: {e})") from None
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{annotations_file}: no category named {', '.join(repr(m) for m in missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} (the model's classes are {names[:10]}...)")
    mapping = {label: by_name[name] for label, name in enumerate(names)}
    return mapping, [{"id": mapping[i], "name": n} for i, n in enumerate(names)]


def predict_to_folder(model: FocusDETR, inputs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                      batch_size: int = 1, score_threshold: float = 0.3, max_detections: int | None = None,
                      draw: bool = True, draw_threshold: float | None = None,
                      categories_file: str | os.PathLike[str] | None = None, progress: bool = False,
                      on_result: Callable[[ImageResult], None] | None = None,
                      model_description: str | None = None, frame_step: int = 1, max_frames: int | None = None,
                      max_download_bytes: int | None = None) -> PredictionSummary:
    """Predict every image found in ``inputs`` (see :func:`discover_images`) and write to ``out_dir``:

    * ``results.json``: COCO results format, a list of ``{"image_id", "category_id", "bbox": [x, y, w, h],
      "score"}`` (boxes in original-image pixels, detections with ``score >= score_threshold``);
    * ``images.json``: a COCO dataset skeleton (``images`` with ``id``, ``file_name``, ``width``, ``height``
      and the input ``path``; ``categories``; no ``annotations``) so that
      ``COCO("images.json").loadRes("results.json")`` works; its ``failed`` list names unreadable inputs;
    * ``annotated/<name>``: each picture at its own size with its detections drawn (``draw``), keeping the
      folder structure below the inputs' common folder; detections below ``draw_threshold`` (default:
      ``score_threshold``) are not drawn.

    Inputs may also be http(s) URLs (downloaded into ``out_dir/downloads/``, at most ``max_download_bytes``
    each, default :data:`focus_detr.data.url_io.MAX_DOWNLOAD_BYTES`), video files (also inside folders) and
    camera / stream sources (needs the ``video`` extra, see :mod:`focus_detr.video`). Every ``frame_step``-th
    frame of a video, at most ``max_frames`` per video, is predicted; each becomes an ``images.json`` entry
    with ``video`` and ``frame_index`` (ids after the still images'), its results carry ``frame_index`` too,
    and ``annotated/<video name>.mp4`` shows the detections. A live stream runs until ``max_frames`` or
    Ctrl+C, then its outputs are completed.

    Unreadable inputs are skipped and listed in the summary's ``failures``; the others are still processed.
    ``model_description`` (e.g. where the weights came from) is recorded in ``images.json``'s ``info``.

    Ctrl-C (SIGINT) or SIGTERM (when called from the main thread) stops after the image in progress: the
    results of the images done are written as above (``images.json``'s ``info`` says ``"interrupted": true``)
    and the summary's ``interrupted_by`` holds the signal. A second signal interrupts at once.
    """
    import signal
    import threading

    from .viz import draw_detections

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items, problems = discover_inputs(inputs)
    failures: list[InputProblem] = list(problems)
    paths, videos, urls = _fetch_inputs(items, out / "downloads", failures, max_download_bytes)
    cfg = model.cfg
    label_to_category, categories = category_mapping(cfg.class_names, categories_file, cfg.num_classes)
    draw_at = score_threshold if draw_threshold is None else draw_threshold
    root = _common_folder([p for p in paths if p not in urls])
    used_names: set[Path] = set()

    records: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    pictures: list[Path] = []
    stop: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: Any) -> None:
            if stop:
                raise KeyboardInterrupt  # the second signal: at once
            stop.append(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    video_summaries: list[VideoSummary] = []
    try:
        results = predict_images(model, paths, batch_size, score_threshold, max_detections, keep_images=draw,
                                 progress=progress)
        try:
            for result in results:
                if result.error is not None:
                    failures.append(InputProblem(urls.get(result.path, str(result.path)), result.error))
                else:
                    det = result.detections
                    assert det is not None
                    rel = Path(result.path.name) if result.path in urls else _relative_name(result.path, root)
                    images.append({"id": result.image_id, "file_name": rel.as_posix(), "width": result.width,
                                   "height": result.height, "path": urls.get(result.path, str(result.path.resolve()))})
                    records.extend(_round_record(r) for r in det.to_coco(result.image_id, label_to_category))
                    if draw:
                        target = _unique(out / "annotated" / _picture_name(rel), used_names)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        picture = draw_detections(result.image, det.boxes, det.scores, det.labels, cfg.class_names,
                                                  score_threshold=draw_at)
                        picture.save(target, **({"quality": 92} if target.suffix.lower() in (".jpg", ".jpeg") else {}))
                        pictures.append(target)
                        result.image = None
                if on_result is not None:
                    on_result(result)
                if stop:
                    break  # the images done so far are written below
        finally:
            results.close()  # the progress bar
        if not stop:
            video_summaries = _predict_videos(
                model, videos, out, len(paths), images, records, failures, pictures, label_to_category, used_names,
                batch_size=batch_size, score_threshold=score_threshold, max_detections=max_detections,
                draw_threshold=draw_at if draw else None, frame_step=frame_step, max_frames=max_frames,
                progress=progress, stop=stop)  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    results_file = out / "results.json"
    images_file = out / "images.json"
    _write_json(results_file, records)
    _write_json(images_file, {
        "info": {"description": "focus-detr predictions", "model": model_description or _config_name(model),
                 "score_threshold": score_threshold, **({"interrupted": True} if stop else {})},
        "images": images, "annotations": [], "categories": categories,
        "failed": [{"path": f.path, "error": f.reason} for f in failures],
    })
    return PredictionSummary(out, results_file, images_file, len(images), len(records),
                             time.perf_counter() - start, pictures, failures,
                             interrupted_by=stop[0] if stop else None, num_inputs=len(paths) + len(videos),
                             videos=video_summaries)


def _fetch_inputs(items: Sequence[InputItem], download_dir: Path, failures: list[InputProblem],
                  max_bytes: int | None) -> tuple[list[Path], list[tuple[str, Path | str]], dict[Path, str]]:
    """Download URL inputs; returns ``(image paths, videos as (label, source), {downloaded path: URL})``."""
    from .data.url_io import MAX_DOWNLOAD_BYTES, DownloadError, download_url
    from .video import is_video_file

    images: list[Path] = []
    videos: list[tuple[str, Path | str]] = []
    urls: dict[Path, str] = {}
    for item in items:
        if item.kind == "url":
            try:
                path = download_url(str(item.source), download_dir, max_bytes=max_bytes or MAX_DOWNLOAD_BYTES)
            except DownloadError as e:
                failures.append(InputProblem(str(item.source), e.reason))
                continue
            urls[path] = str(item.source)
            (videos.append((str(item.source), path)) if is_video_file(path) else images.append(path))
        elif item.kind == "image":
            images.append(Path(item.source))
        else:  # a local video or a live stream
            videos.append((str(item.source), item.source))
    return images, videos, urls


@dataclass
class VideoSummary:
    """One video or stream processed by :func:`predict_to_folder`: frames predicted and how fast."""

    source: str
    frames: int
    seconds: float
    annotated: Path | None = None
    stopped: str | None = None  # why a live stream or a video ended early (e.g. "interrupted")

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        out = f" -> {self.annotated}" if self.annotated is not None else ""
        note = f" ({self.stopped})" if self.stopped else ""
        return (f"{self.source}: {self.frames} frame(s) in {self.seconds:.1f} s "
                f"({self.frames_per_second:.1f} frames/s){note}{out}")


def predict_video(model: FocusDETR, source: "str | os.PathLike[str] | VideoReader", batch_size: int = 1,
                  score_threshold: float = 0.0, max_detections: int | None = None, frame_step: int = 1,
                  max_frames: int | None = None) -> Iterator[tuple["VideoFrame", Detections]]:
    """Yield ``(frame, detections)`` for every ``frame_step``-th frame of a video file, stream or camera
    (:func:`focus_detr.video.open_video`, or an open reader, which is then closed), at most ``max_frames``;
    ``frame.index`` counts all decoded frames from 0, so it is the frame's position in the video whatever
    ``frame_step`` is. Needs PyAV."""
    from .video import VideoReader, open_video

    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1, got {frame_step}")
    with (source if isinstance(source, VideoReader) else open_video(source)) as video:
        batch: list[VideoFrame] = []
        taken = 0
        for frame in video:
            if frame.index % frame_step:
                continue
            batch.append(frame)
            taken += 1
            last = max_frames is not None and taken >= max_frames
            if len(batch) >= batch_size or last:
                dets = model.predict([f.image for f in batch], score_threshold=score_threshold,
                                     max_detections=max_detections, batch_size=len(batch))
                yield from zip(batch, (_to_cpu(d) for d in dets))
                batch = []
            if last:
                break
        if batch:
            dets = model.predict([f.image for f in batch], score_threshold=score_threshold,
                                 max_detections=max_detections, batch_size=len(batch))
            yield from zip(batch, (_to_cpu(d) for d in dets))


def _predict_videos(model: FocusDETR, videos: Sequence[tuple[str, Path | str]], out: Path, first_id: int,
                    images: list[dict[str, Any]], records: list[dict[str, Any]], failures: list[InputProblem],
                    pictures: list[Path], label_to_category: dict[int, int] | None, used_names: set[Path], *,
                    batch_size: int, score_threshold: float, max_detections: int | None,
                    draw_threshold: float | None, frame_step: int, max_frames: int | None,
                    progress: bool, stop: Sequence[int] = ()) -> list[VideoSummary]:
    """predict_to_folder's video part: appends to ``images`` / ``records`` / ``failures`` / ``pictures``."""
    from .data.errors import DataError
    from .video import VideoWriter, is_stream, open_video

    summaries: list[VideoSummary] = []
    next_id = first_id + 1
    for label, source in videos:
        if stop:
            break
        try:
            video = open_video(source)  # predict_video reads and closes it
            name, fps, total = video.name, video.fps, video.frame_count
        except ImportError as e:
            failures.append(InputProblem(label, f"a video: {e}"))
            continue
        except DataError as e:
            failures.append(InputProblem(label, e.reason))
            continue
        target = None
        if draw_threshold is not None:
            target = _unique(out / "annotated" / (Path(name).stem + ".mp4"), used_names)
        if total is not None:
            total = -(-total // frame_step)
            total = min(total, max_frames) if max_frames is not None else total
        bar = _progress(total or 0, Path(name).name, "frame", progress)
        start, frames, stopped = time.perf_counter(), 0, None
        writer = VideoWriter(target, fps=(fps or 25.0) / frame_step) if target is not None else None
        try:
            for frame, det in predict_video(model, video, batch_size, score_threshold, max_detections,
                                            frame_step, max_frames):
                h, w = frame.image.shape[:2]
                images.append({"id": next_id, "file_name": f"{Path(name).stem}/frame_{frame.index:06d}",
                               "width": w, "height": h, "path": label, "video": label,
                               "frame_index": frame.index, "time_s": frame.time_s})
                for record in det.to_coco(next_id, label_to_category):
                    record["frame_index"] = frame.index
                    records.append(_round_record(record))
                if writer is not None:
                    # legend=False: every frame of a video must keep the same size
                    writer.write(np.asarray(det.plot(frame.image, score_threshold=draw_threshold, legend=False)))
                next_id += 1
                frames += 1
                bar.update(1)
                if stop:  # Ctrl-C / SIGTERM caught by predict_to_folder: finish this video's outputs, then stop
                    stopped = "interrupted"
                    break
        except KeyboardInterrupt:
            if not is_stream(label):
                raise
            stopped = "stopped by Ctrl+C"  # a live stream has no end: Ctrl+C is how it is stopped
        except DataError as e:
            failures.append(InputProblem(label, e.reason))
            stopped = "failed"
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if writer is not None and writer.frames:
            pictures.append(target)
        summaries.append(VideoSummary(label, frames, time.perf_counter() - start,
                                      target if writer is not None and writer.frames else None, stopped))
    return summaries


def _round_record(record: dict[str, Any]) -> dict[str, Any]:
    # Two decimals of a pixel and 5 significant score digits: exact enough for COCO eval, half the file size.
    record["bbox"] = [round(float(v), 2) for v in record["bbox"]]
    record["score"] = float(f"{record['score']:.5g}")
    return record


def _config_name(model: FocusDETR) -> str:
    cfg = model.cfg
    return f"{type(cfg.backbone).__name__}, encoder {cfg.encoder.mode}, {cfg.num_classes} classes"


def _common_folder(paths: Sequence[Path]) -> Path | None:
    if not paths:
        return None
    try:
        return Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    except ValueError:  # different drives (Windows)
        return None


def _relative_name(path: Path, root: Path | None) -> Path:
    if root is not None:
        try:
            return path.resolve().relative_to(root)
        except ValueError:
            pass
    return Path(path.name)


def _picture_name(rel: Path) -> Path:
    """Keep JPEG / PNG names; anything else (TIFF, BMP, WebP, misnamed files) is written as PNG."""
    return rel if rel.suffix.lower() in (".jpg", ".jpeg", ".png") else rel.with_name(rel.name + ".png")


def _unique(target: Path, used: set[Path]) -> Path:
    """``target`` or ``stem_2.ext``, ``stem_3.ext``... if an earlier picture of this run took the name."""
    candidate, n = target, 1
    while candidate in used:
        n += 1
        candidate = target.with_name(f"{target.stem}_{n}{target.suffix}")
    used.add(candidate)
    return candidate


def _write_json(path: Path, data: Any) -> None:
    from .weights.files import atomic_write_bytes  # unique temporary name per process, fsync, rename

    atomic_write_bytes(path, (json.dumps(data, indent=None, separators=(",", ":")) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# Explanation


class Explanation(NamedTuple):
    """:func:`explain`'s result; unpacks as ``figure, arrays, detections``."""

    figure: "Figure | None"  # None when explain(..., figure=False)
    arrays: dict[str, np.ndarray]
    detections: Detections


@torch.no_grad()
def explain(model: FocusDETR, image: Any, score_threshold: float = 0.3, max_detections: int = 50,
            title: str | None = None, width_inches: float = 16.0, figure: bool = True) -> Explanation:
    """Where Focus-DETR looks in one image: :func:`focus_detr.viz.explain_figure` and its arrays.

    ``image`` is a path, PIL image or array (as :meth:`FocusDETR.predict` takes). The model sees the image
    after its test-time resize; the figure is drawn on the *original* picture, with the token maps stretched
    from the network input onto it, and the detections (also returned, in original pixels) are drawn there.
    ``score_threshold`` / ``max_detections`` select the detections drawn and returned.
    ``arrays`` is :func:`focus_detr.viz.explain_arrays` plus ``image_size`` (original ``(h, w)``),
    ``input_size`` (network input ``(h, w)``) and the detections (``det_boxes``, ``det_scores``, ``det_labels``).
    ``figure=False`` skips drawing the figure (``Explanation.figure`` is None): the arrays and detections only.
    """
    from .data.image_io import to_rgb_array
    from .model.preprocess import preprocess
    from .viz import explain_arrays, explain_figure

    cfg = model.cfg
    array = to_rgb_array(image)
    network_input, original = preprocess(array, cfg)  # the resize predict uses
    was_training = model.training
    model.eval()
    try:
        batch = model.batch([network_input])
        outputs = model(batch)
        det = model.postprocess(outputs, torch.tensor([original]), score_threshold=score_threshold,
                                max_detections=max_detections)[0]
    finally:
        model.train(was_training)
    det = _to_cpu(det)
    trace = outputs.encoder_trace
    fg = None if outputs.foreground_logits is None else outputs.foreground_logits[0].cpu()
    selected = [t[0].cpu() for t in trace.selected_indices]
    valid = [t[0].cpu() for t in trace.selected_valid] if trace.selected_valid else None
    oesm = [t[0].cpu() for t in trace.oesm_indices]
    input_size = tuple(int(v) for v in outputs.image_sizes[0].tolist())
    canvas = tuple(int(v) for v in batch.tensor.shape[-2:])
    common = dict(image_size=input_size, canvas_size=canvas, selected_valid=valid)
    arrays = explain_arrays(fg, outputs.spatial_shapes.cpu(), selected, oesm, **common)
    drawn = None if not figure else explain_figure(
        array, fg, outputs.spatial_shapes.cpu(), selected, oesm, detections=(det.boxes, det.scores, det.labels),
        class_names=cfg.class_names, score_threshold=score_threshold, max_detections=max_detections, title=title,
        width_inches=width_inches, **common)
    arrays.update({
        "image_size": np.asarray(array.shape[:2], dtype=np.int64),
        "input_size": np.asarray(input_size, dtype=np.int64),
        "det_boxes": det.boxes.numpy().astype(np.float32).reshape(-1, 4),
        "det_scores": det.scores.numpy().astype(np.float32),
        "det_labels": det.labels.numpy().astype(np.int64),
    })
    return Explanation(drawn, arrays, det)


__all__ = ["IMAGE_EXTENSIONS", "InputProblem", "InputItem", "discover_images", "discover_inputs", "VideoSummary",
           "predict_video", "resolve_device", "load_model", "ImageResult",
           "predict_images", "PredictionSummary", "category_mapping", "predict_to_folder", "Explanation", "explain"]
