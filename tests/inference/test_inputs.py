"""Inputs beyond local image files: http(s) URLs (served by a local HTTP server on 127.0.0.1 that the tests
start themselves), videos written with PyAV, camera / stream sources, and ``model(path_or_image)``.
End to end through the console script where the behaviour is a command-line one."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import focus_detr
from focus_detr.inference import discover_inputs
from focus_detr.data.errors import DataError
from focus_detr.data.image_io import to_rgb_array
from focus_detr.data.url_io import DownloadError, download_url, is_url
from focus_detr.video import VideoWriter, is_stream, open_video
from cli_utils import make_picture, run_cli, save_tiny_weights

BIG_BYTES = 300_000  # the "too large" file: over a 0.1 MB limit


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the test folder; ``/slow.jpg`` stalls, ``/nolength.bin`` streams without Content-Length."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/slow.jpg":
            time.sleep(3)
        if self.path == "/redirect-to-loopback.jpg":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/street.jpg")
            self.end_headers()
            return
        if self.path == "/nolength.bin":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the size limit must be enforced while reading
            for _ in range(BIG_BYTES // 1000):
                self.wfile.write(b"x" * 1000)
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """``(base URL, folder)``: a local HTTP server on 127.0.0.1 serving a folder with a picture, a video
    and a large file."""
    root = tmp_path_factory.mktemp("served")
    make_picture(root / "street.jpg", (120, 160), 7)
    write_video(root / "clip.mp4", frames=4)
    (root / "big.bin").write_bytes(b"\0" * BIG_BYTES)
    write_hls(root / "hls" / "live.m3u8", frames=8)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.pt")


def write_video(path: Path, frames: int, size: tuple[int, int] = (72, 96), fps: float = 10.0) -> Path:
    """A short MP4 written with PyAV: a bright square moving over a dark background."""
    h, w = size
    with VideoWriter(path, fps=fps) as writer:
        for k in range(frames):
            frame = np.full((h, w, 3), 30, np.uint8)
            x = (8 * k) % (w - 24)
            frame[20:44, x:x + 24] = (240, 200, 40)
            writer.write(frame)
    return path


def write_hls(playlist: Path, frames: int) -> Path:
    """An HLS stream (playlist + MPEG-TS segment) written with PyAV: a live source a test can serve."""
    import av

    playlist.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(playlist), "w", format="hls", options={"hls_time": "1", "hls_list_size": "0"})
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
    for k in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((72, 96, 3), 20 * k, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return playlist


# --------------------------------------------------------------------------------------------------
# URLs


def test_url_recognised_before_path_conversion(tmp_path: Path) -> None:
    assert is_url("https://example.com/a//b.jpg") and is_url("HTTP://x/y.png")
    assert not is_url("photos/a.jpg") and not is_url(Path("https://x/y.jpg"))  # Path() already collapsed it
    items, problems = discover_inputs(["https://example.com/a//b.jpg", "rtsp://cam.local/live", "camera:0"])
    assert [(it.kind, it.source) for it in items] == [
        ("url", "https://example.com/a//b.jpg"), ("stream", "rtsp://cam.local/live"), ("stream", "camera:0")]
    assert not problems
    assert is_stream("/dev/video2") and is_stream("https://x/live.m3u8") and not is_stream("clip.mp4")


def test_download_errors_are_one_line(served, tmp_path: Path) -> None:
    base, _ = served
    path = download_url(f"{base}/street.jpg", tmp_path)
    assert path.name == "street.jpg" and path.stat().st_size > 0
    cases = [
        (f"{base}/missing.jpg", {}, "HTTP 404"),
        (f"{base}/big.bin", {"max_bytes": 100_000}, "too large (0.3 MB; the limit is 0.1 MB)"),
        (f"{base}/nolength.bin", {"max_bytes": 100_000}, "too large (more than the limit of 0.1 MB)"),
        (f"{base}/slow.jpg", {"timeout": 0.5}, "timed out after 0.5 s"),
        ("http://127.0.0.1:9/x.jpg", {"timeout": 2}, "download failed"),  # port 9: nothing listens
    ]
    for url, kwargs, message in cases:
        with pytest.raises(DownloadError) as info:
            download_url(url, tmp_path / "d", **kwargs)
        text = str(info.value)
        assert text.startswith(url) and message in text and "\n" not in text, text
    assert not list((tmp_path / "d").glob("*")), "partial downloads are removed"


def test_public_only_refuses_private_hosts_and_redirects(served, tmp_path: Path, monkeypatch) -> None:
    """The app's guard when the network can reach it: non-global addresses are refused, also after a redirect."""
    from focus_detr.data import url_io

    base, _ = served
    port = base.rsplit(":", 1)[1]
    with pytest.raises(DownloadError, match="refused: 127.0.0.1 is a loopback, private or link-local address"):
        download_url(f"{base}/street.jpg", tmp_path / "a", public_only=True)
    assert download_url(f"{base}/street.jpg", tmp_path / "b").is_file()  # the default is unchanged
    # "localhost" made to look public: the check passes, the connection still reaches the local server.
    real_resolve = url_io._resolve
    monkeypatch.setattr(url_io, "_resolve", lambda host: ["93.184.216.34"] if host == "localhost" else real_resolve(host))
    assert download_url(f"http://localhost:{port}/street.jpg", tmp_path / "c", public_only=True).is_file()
    with pytest.raises(DownloadError, match="refused: 127.0.0.1") as info:
        download_url(f"http://localhost:{port}/redirect-to-loopback.jpg", tmp_path / "d", public_only=True)
    assert "\n" not in str(info.value) and not list((tmp_path / "d").glob("*"))
    for address in ("10.1.2.3", "172.16.0.1", "192.168.1.5", "169.254.169.254", "0.0.0.0", "::1", "fe80::1%eth0",
                    "::ffff:127.0.0.1", "fc00::1", "100.64.0.1"):
        monkeypatch.setattr(url_io, "_resolve", lambda host, a=address: ["93.184.216.34", a])
        with pytest.raises(DownloadError, match="refused"):
            url_io.check_public_url("http://intranet.example/x.jpg")
    monkeypatch.setattr(url_io, "_resolve", lambda host: ["93.184.216.34", "2606:2800:220:1::1"])
    url_io.check_public_url("http://example.com/x.jpg")


def test_predict_urls_end_to_end(served, weights: Path, tmp_path: Path) -> None:
    base, root = served
    proc = run_cli("predict", weights, f"{base}/missing.jpg", f"{base}/big.bin", f"{base}/street.jpg",
                   "--out", tmp_path / "o", "--max-download-mb", "0.1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{base}/missing.jpg: HTTP 404" in proc.stderr
    assert f"{base}/big.bin: too large" in proc.stderr
    # The good URL is still processed: downloaded into OUT/downloads, named after the URL, its URL recorded.
    out = tmp_path / "o"
    images = json.loads((out / "images.json").read_text())
    assert [(im["file_name"], im["path"], im["width"], im["height"]) for im in images["images"]] == [
        ("street.jpg", f"{base}/street.jpg", 160, 120)]
    assert {f["path"] for f in images["failed"]} == {f"{base}/missing.jpg", f"{base}/big.bin"}
    assert (out / "downloads" / "street.jpg").read_bytes() == (root / "street.jpg").read_bytes()
    assert (out / "annotated" / "street.jpg").is_file()
    results = json.loads((out / "results.json").read_text())
    assert all(r["image_id"] == 1 for r in results)


def test_explain_url_end_to_end(served, weights: Path, tmp_path: Path) -> None:
    base, _ = served
    proc = run_cli("explain", weights, f"{base}/street.jpg", "--out", tmp_path / "e", "--dpi", "40")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "e" / "detections.json").read_text())["width"] == 160
    proc = run_cli("explain", weights, f"{base}/missing.jpg", "--out", tmp_path / "e2")
    assert proc.returncode == 1 and f"{base}/missing.jpg: HTTP 404" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# Python: model(...), URLs, Detections.plot


def test_model_call_on_paths_urls_and_images(served, weights: Path) -> None:
    base, root = served
    model = focus_detr.load(weights)
    by_path = model(str(root / "street.jpg"))
    assert isinstance(by_path, focus_detr.Detections)
    reference = model.predict(root / "street.jpg")
    assert torch.equal(by_path.scores, reference.scores) and torch.equal(by_path.boxes, reference.boxes)
    by_url = model(f"{base}/street.jpg")  # the "//" survives: no Path() before download
    assert torch.equal(by_url.scores, reference.scores)
    listed = model([root / "street.jpg", np.asarray(Image.open(root / "street.jpg"))])
    assert isinstance(listed, list) and len(listed) == 2 and torch.equal(listed[1].scores, reference.scores)
    # The ImageBatch path is untouched: raw outputs, as before.
    batch = model.batch([torch.from_numpy(to_rgb_array(root / "street.jpg")).permute(2, 0, 1)])
    with torch.no_grad():
        outputs = model(batch)
    assert hasattr(outputs, "main") and outputs.main.logits.shape[0] == 1
    with pytest.raises(TypeError, match="ImageBatch"):
        model(str(root / "street.jpg"), targets=[])
    with pytest.raises(DataError, match="HTTP 404"):
        model(f"{base}/missing.jpg")
    picture = by_path.plot(root / "street.jpg")
    assert isinstance(picture, Image.Image) and picture.size == (160, 120)


# --------------------------------------------------------------------------------------------------
# Videos


def test_video_reader_and_writer_round_trip(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", frames=5, size=(61, 83))  # odd size: padded to even
    with open_video(path) as video:
        assert video.fps == pytest.approx(10.0) and video.frame_count == 5
        frames = list(video)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert frames[2].time_s == pytest.approx(0.2) and frames[0].image.shape == (62, 84, 3)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DataError, match="bad.mp4: cannot open video"):
        open_video(bad)


def test_predict_video_end_to_end(weights: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_video(folder / "clip.mp4", frames=6)
    make_picture(folder / "still.jpg", (64, 80), 3)
    out = tmp_path / "out"
    proc = run_cli("predict", weights, folder, "--out", out, "--score-threshold", "0", "--max-detections", "5",
                   "--frame-step", "2", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "clip.mp4: 3 frame(s)" in proc.stdout and "frames/s" in proc.stdout
    images = json.loads((out / "images.json").read_text())["images"]
    still, *frames = images
    assert still["file_name"] == "still.jpg" and still["id"] == 1
    assert [f["frame_index"] for f in frames] == [0, 2, 4]  # the video inside the folder is not skipped
    assert [f["id"] for f in frames] == [2, 3, 4] and all(f["video"].endswith("clip.mp4") for f in frames)
    results = json.loads((out / "results.json").read_text())
    by_id = {f["id"]: f["frame_index"] for f in frames}
    video_records = [r for r in results if r["image_id"] in by_id]
    assert {r["image_id"] for r in video_records} == set(by_id) and len(video_records) <= 3 * 5
    assert all(r["frame_index"] == by_id[r["image_id"]] for r in video_records)
    with open_video(out / "annotated" / "clip.mp4") as annotated:
        assert sum(1 for _ in annotated) == 3 and annotated.width == 96 and annotated.height == 72


def test_predict_live_stream_until_max_frames(served, weights: Path, tmp_path: Path) -> None:
    # An HLS playlist is a live source: read as a stream (never downloaded), stopped by --max-frames.
    base, _ = served
    url = f"{base}/hls/live.m3u8"
    out = tmp_path / "out"
    proc = run_cli("predict", weights, url, "--out", out, "--max-frames", "3", "--score-threshold", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert f"{url}: 3 frame(s)" in proc.stdout and "frames/s" in proc.stdout
    frames = json.loads((out / "images.json").read_text())["images"]
    assert [(f["video"], f["frame_index"]) for f in frames] == [(url, 0), (url, 1), (url, 2)]
    assert not (out / "downloads").exists()
    with open_video(out / "annotated" / "live.mp4") as annotated:
        assert sum(1 for _ in annotated) == 3


def test_video_without_pyav_is_reported_not_skipped(weights: Path, tmp_path: Path) -> None:
    # A fake "av" package that fails to import stands for an installation without the video extra.
    fake = tmp_path / "no_av" / "av"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no PyAV here')\n")
    folder = tmp_path / "in"
    write_video(folder / "clip.mp4", frames=2)
    make_picture(folder / "still.jpg", (64, 80), 3)
    proc = run_cli("predict", weights, folder, "--out", tmp_path / "o",
                   env_extra={"PYTHONPATH": str(tmp_path / "no_av")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "clip.mp4: a video: video input needs PyAV: pip install 'focus-detr[video]'" in proc.stderr
    images = json.loads((tmp_path / "o" / "images.json").read_text())["images"]
    assert [im["file_name"] for im in images] == ["still.jpg"]  # the image is still processed
