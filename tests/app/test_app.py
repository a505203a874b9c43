"""`focus-detr app`: the page's logic (focus_detr.app.core) directly, the command's errors, and the page itself
driven in a real headless browser (system Chromium + chromedriver through Selenium; `.ci/run` installs them).

The browser test starts the console script on a free 127.0.0.1 port with a tiny model, uploads a picture, moves
the threshold and keep-ratio sliders, opens the focus-map tab, uploads a file that is not an image, and saves
screenshots (to pytest's tmp folder, and also to $FOCUS_DETR_APP_SCREENSHOTS when set).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import focus_detr
from cli_utils import cli_command
from focus_detr.app import core
from focus_detr.cli.app_cmd import add_parser, is_loopback
from focus_detr.data.synthetic import SHAPES_CLASS_NAMES, make_shapes_dataset

REPO = Path(__file__).resolve().parents[2]


def tiny_model(seed: int = 0, short_side: int = 128):
    """The tiny preset with the shapes' classes, run at a small size (fast on a loaded 2-core machine)."""
    torch.manual_seed(seed)
    return focus_detr.build_model("tiny", num_classes=len(SHAPES_CLASS_NAMES), class_names=SHAPES_CLASS_NAMES,
                                  test_short_side=short_side, test_max_size=2 * short_side).eval()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> list[Path]:
    info = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=0, num_val=2)
    return sorted(info.val_image_dir.iterdir())


@pytest.fixture(scope="module")
def analysis(shapes) -> core.Analysis:
    model = tiny_model()
    return core.analyse(model, core.read_upload(shapes[0]), keep_ratio=0.5, name=shapes[0].name)


# --------------------------------------------------------------------------------------------------
# Reading uploads: every bad input is one line for the page


def test_read_upload_gives_rgb(shapes) -> None:
    image = core.read_upload(shapes[0])
    assert image.dtype == np.uint8 and image.shape == (192, 256, 3)


@pytest.mark.parametrize("case, message", [
    ("text", "notes.png: not an image file"),
    ("truncated", "truncated or corrupt"),
    ("empty", "empty (0 bytes)"),
    ("too_many_pixels", "above the limit of 40000000 (the app's limit)"),
    ("too_many_bytes", "above the upload limit of 20 MB"),
    ("missing", "the upload did not arrive"),
])
def test_bad_uploads_are_one_line_messages(tmp_path, shapes, case: str, message: str) -> None:
    path = tmp_path / "notes.png"
    if case == "text":
        path.write_text("this is not an image\n")
    elif case == "truncated":
        path = tmp_path / "cut.jpg"
        data = shapes[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "too_many_pixels":  # a small file that would decode to 48 M pixels
        Image.new("1", (8000, 6000)).save(path)
        assert path.stat().st_size < 100_000
    elif case == "too_many_bytes":  # a sparse file: no disk used
        with open(path, "wb") as f:
            f.truncate(core.MAX_UPLOAD_BYTES + 1)
    elif case == "missing":
        path = tmp_path / "gone.png"
    with pytest.raises(core.UploadError) as info:
        core.read_upload(path, name=path.name)
    text = str(info.value)
    assert message in text and "\n" not in text and "Traceback" not in text


def test_no_upload_and_bad_urls() -> None:
    with pytest.raises(core.UploadError, match="no image"):
        core.read_upload(None)
    with pytest.raises(core.UploadError, match="pasted image: the upload did not arrive"):
        core.read_upload("", name="pasted image")
    for url in ("", "ftp://example.com/a.jpg", "photo.jpg"):
        with pytest.raises(core.UploadError, match="give an http:// or https:// address"):
            core.read_url(url)


def test_read_url_from_a_local_server(tmp_path, shapes) -> None:
    """A picture served by a server this test starts on 127.0.0.1, then a 404 from it."""
    import functools
    import http.server
    import threading

    shutil.copy(shapes[1], tmp_path / "shape.jpg")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        image, name = core.read_url(f"{base}/shape.jpg")
        assert name == "shape.jpg" and np.array_equal(image, core.read_upload(shapes[1]))
        with pytest.raises(core.UploadError, match="404"):
            core.read_url(f"{base}/missing.jpg")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------
# One model run, then threshold, table, json and focus maps without running it again


def test_analysis_is_explain_with_timing(analysis, shapes) -> None:
    from focus_detr.inference import explain

    reference = explain(tiny_model(), shapes[0], score_threshold=0.0, max_detections=core.MAX_DETECTIONS)
    assert torch.equal(analysis.detections.scores, reference.detections.scores)
    assert torch.equal(analysis.detections.boxes, reference.detections.boxes)
    for key, value in reference.arrays.items():
        assert np.array_equal(analysis.arrays[key], value), key
    assert len(analysis.detections) == core.MAX_DETECTIONS
    assert (np.diff(analysis.detections.scores.numpy()) <= 0).all()  # most confident first
    assert 0 < analysis.encoder_ms < analysis.forward_ms
    assert analysis.num_layers == 2 and analysis.num_levels == 4


def test_explain_without_figure(shapes) -> None:
    from focus_detr.inference import explain

    model = tiny_model()
    full = explain(model, shapes[0], score_threshold=0.0)
    bare = explain(model, shapes[0], score_threshold=0.0, figure=False)
    assert full.figure is not None and bare.figure is None
    assert torch.equal(full.detections.scores, bare.detections.scores)
    assert sorted(full.arrays) == sorted(bare.arrays)


@pytest.mark.parametrize("keep_ratio", [0.1, 0.3, 0.75, 1.0])
def test_keep_ratio_sets_the_token_budget(shapes, keep_ratio: float) -> None:
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = core.analyse(model, core.read_upload(shapes[0]), keep_ratio=keep_ratio)
    valid = int(result.arrays["valid_count"])
    assert result.keep_ratio == keep_ratio == model.cfg.encoder.keep_ratio == model.encoder.cfg.keep_ratio
    # The foreground budget of the first layer: int(keep_ratio * valid tokens) + 1 (at most all of them).
    assert int(result.arrays["selected_inside_count"][0]) == min(int(keep_ratio * valid) + 1, valid)
    assert f"Keep ratio **{keep_ratio:.2f}**" in core.tokens_markdown(result)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # weights untouched


def test_keep_ratio_is_checked_and_dense_models_have_none(shapes) -> None:
    model = tiny_model()
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
            core.set_keep_ratio(model, bad)
    torch.manual_seed(0)
    dense = focus_detr.build_model("tiny", test_short_side=96, test_max_size=192, **{"encoder.mode": "dense"}).eval()
    assert not core.selects_tokens(dense)
    result = core.analyse(dense, core.read_upload(shapes[0]), keep_ratio=0.2)
    assert result.keep_ratio is None and dense.cfg.encoder.keep_ratio == 0.5  # left alone
    assert "Dense encoder" in core.tokens_markdown(result)
    assert core.foreground_maps(result) == []  # no foreground scores in dense mode


@given(threshold=st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_threshold_filters_table_and_json(analysis, tmp_path_factory, threshold: float) -> None:
    kept = core.above(analysis.detections, threshold)
    scores = analysis.detections.scores
    assert len(kept) == int((scores >= threshold).sum())
    rows = core.table_rows(kept)
    assert [r[0] for r in rows] == list(range(1, len(kept) + 1))
    assert all(r[1] in SHAPES_CLASS_NAMES for r in rows)
    path = core.write_coco_json(analysis, threshold, tmp_path_factory.mktemp("json"))
    records = json.loads(path.read_text())
    assert len(records) == len(kept)
    for record, reference in zip(records, kept.to_coco(image_id=1)):
        assert record["category_id"] == reference["category_id"] and record["image_id"] == 1
        assert record["bbox"] == pytest.approx(reference["bbox"], abs=0.01)
    summary = core.summary_markdown(analysis, threshold)
    assert f"**{len(kept)} detection" in summary


def test_drawing_uses_the_library(analysis) -> None:
    from focus_detr.viz import draw_detections

    for threshold in (0.0, 0.05, 1.0):
        expected = draw_detections(analysis.image, analysis.detections, score_threshold=threshold)
        assert np.array_equal(np.asarray(core.draw(analysis, threshold)), np.asarray(expected))
    assert np.array_equal(np.asarray(core.draw(analysis, 1.0)), analysis.image)  # nothing above 1: the picture


def test_focus_maps(analysis) -> None:
    levels = core.foreground_maps(analysis)
    assert [caption.split(":")[0] for _, caption in levels] == ["8 px", "16 px", "32 px", "64 px"]
    assert all(im.size == (640, 480) for im, _ in levels)  # 256 x 192 enlarged to FOCUS_MAP_SIDE
    valid = int(analysis.arrays["valid_count"])
    yellow_shares = []
    for layer in range(analysis.num_layers):
        picture, caption = core.kept_map(analysis, layer)
        count = int(analysis.arrays["selected_inside_count"][layer])
        assert picture.size == (640, 480) and f"{count:,} of {valid:,} tokens updated" in caption
        rgb = np.asarray(picture).astype(int)
        yellow_shares.append(float(((rgb[..., 0] - rgb[..., 2]) > 60).mean()))
        oesm = core.oesm_map(analysis, layer)
        assert oesm is not None
        total = sum(int(analysis.arrays[f"oesm_layer{layer}_level{lv}"].sum()) for lv in range(4))
        assert f"the {total:,} top-scoring tokens" in oesm[1]
    assert yellow_shares[1] < yellow_shares[0]  # the cascade: the second layer keeps fewer tokens
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        core.kept_map(analysis, 2)


def test_large_pictures_are_shrunk_for_the_focus_maps(shapes) -> None:
    big = np.asarray(Image.open(shapes[0]).resize((1280, 960)))
    result = core.analyse(tiny_model(short_side=96), big)
    assert result.arrays["image_size"].tolist() == [960, 1280]
    assert core.kept_map(result, 0)[0].size == (core.FOCUS_MAP_SIDE, 480)


def test_examples_are_the_demo_held_out_shapes_and_photos(tmp_path) -> None:
    examples = core.example_images(tmp_path, num_shapes=2)
    assert [e.label for e in examples[:2]] == ["held-out shapes 1", "held-out shapes 2"]
    demo_val = make_shapes_dataset(tmp_path / "demo", num_train=0, num_val=2)  # the demo's seed and sizes
    for example, reference in zip(examples, sorted(demo_val.val_image_dir.iterdir())):
        assert example.path.read_bytes() == reference.read_bytes()
    photos = examples[2:]
    assert "Grace Hopper" in [p.label for p in photos]  # matplotlib is in the test extra
    for photo in photos:
        assert core.read_upload(photo.path).ndim == 3


# --------------------------------------------------------------------------------------------------
# The command's errors


def run_app(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([*cli_command(), "app", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_busy_port_fails_fast_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_app("--preset", "tiny", "--random-init", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: the port is in use (choose another "
                                      "with --port)")


@pytest.mark.parametrize("args, message", [
    (["--random-init"], "--random-init needs --preset"),
    (["w.pt", "--preset", "tiny", "--random-init"], "give either WEIGHTS or --random-init"),
    (["--port", "70000"], "argument --port: a port is 1-65535, got 70000"),
])
def test_usage_errors(args, message: str, capsys) -> None:
    from focus_detr.cli.main import main

    port = _free_port()
    try:
        code = main(["app", *args, *([] if "--port" in args else ["--port", str(port)])])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_gradio_says_which_extra(monkeypatch, capsys) -> None:
    import importlib.util

    from focus_detr.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app", "--preset", "tiny", "--random-init"]) == 2
    assert capsys.readouterr().err == "error: focus-detr app needs the optional app extra: pip install 'focus-detr[app]'\n"


def test_loopback_only_by_default() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["app"]).host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


@pytest.mark.parametrize("host,allow,public_only", [("127.0.0.1", False, False), ("0.0.0.0", False, True),
                                                    ("0.0.0.0", True, False), ("localhost", False, False)])
def test_url_box_fetches_public_addresses_only_when_the_network_can_reach_the_app(monkeypatch, host, allow,
                                                                                 public_only) -> None:
    import focus_detr.app as app_package
    from focus_detr.app import ui

    seen = {}
    monkeypatch.setattr(core, "example_images", lambda work: [])
    monkeypatch.setattr(ui, "build_app", lambda *a: seen.setdefault("public_urls_only", a[4]))
    monkeypatch.setattr(ui, "launch", lambda *a, **k: None)
    app_package.serve(None, host=host, port=1, allow_private_urls=allow)
    assert seen["public_urls_only"] is public_only


def test_cli_warns_about_the_network_and_passes_the_url_policy(monkeypatch, capsys) -> None:
    import focus_detr.app as app_package
    from focus_detr.cli.main import main

    calls = []
    monkeypatch.setattr(app_package, "serve", lambda *a, **k: calls.append(k["allow_private_urls"]))
    port = str(_free_port())
    assert main(["app", "--host", "0.0.0.0", "--port", port, "--preset", "tiny", "--random-init", "--quiet"]) == 0
    assert "its URL box fetches public addresses only" in capsys.readouterr().err
    assert main(["app", "--host", "0.0.0.0", "--port", port, "--preset", "tiny", "--random-init", "--quiet",
                 "--allow-private-urls"]) == 0
    assert "private networks included (--allow-private-urls)" in capsys.readouterr().err
    assert calls == [False, True]


def test_read_url_public_only_refuses_this_machine(tmp_path, shapes) -> None:
    with pytest.raises(core.UploadError, match="refused: 127.0.0.1 is a loopback") as info:
        core.read_url("http://127.0.0.1:9/shape.jpg", public_only=True)  # refused before any connection
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# The page in a real browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_or_skip():
    """Headless Chromium through Selenium; in CI a missing browser is a failure, elsewhere a skip that says how
    to install it."""
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install 'focus-detr[test]')")
    if missing:
        why = f"needs {', '.join(missing)}: `make browser` installs Chromium (apt)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1700", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def served_app(tmp_path):
    """`focus-detr app --port N` without weights, in a folder where `runs/demo/model_final.pth` exists (a tiny
    model at 128 px), in a subprocess; yields the page's URL."""
    focus_detr.save(tiny_model(), tmp_path / "runs" / "demo" / "model_final.pth")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([*cli_command(), "app", "--port", str(port), "--threads", "1"],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine imports torch and gradio slowly
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the app did not start (exit {process.poll()}):\n{(tmp_path / 'app.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _upload(url: str, size: int) -> int:
    """POST a ``size``-byte file to Gradio's upload route; returns the HTTP status."""
    import urllib.error

    boundary = "focusdetrtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + bytes(size) + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_page_in_a_headless_browser(served_app, tmp_path, shapes, analysis) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    browser = _browser_or_skip()
    shots = [tmp_path / "screens"] + ([Path(os.environ["FOCUS_DETR_APP_SCREENSHOTS"])]
                                      if os.environ.get("FOCUS_DETR_APP_SCREENSHOTS") else [])
    for folder in shots:
        folder.mkdir(parents=True, exist_ok=True)

    def screenshot(name: str) -> None:
        for folder in shots:
            browser.save_screenshot(str(folder / f"{name}.png"))

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def wait_for(condition, what: str, seconds: float = 60):
        try:
            return WebDriverWait(browser, seconds, poll_frequency=0.2).until(lambda _: condition(), message=what)
        except Exception:
            screenshot(f"failed_{what.replace(' ', '_')[:40]}")
            raise

    def set_number(element_id: str, value: float) -> None:
        box = browser.find_element(By.CSS_SELECTOR, f"#{element_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.ENTER)
        # Then leave the box, as a person clicking elsewhere does: Gradio also commits a number on blur, which
        # a loaded machine sometimes needs when the Enter arrived before the box's handler was ready.
        box.send_keys(Keys.TAB)

    def picture_pixels() -> np.ndarray:
        src = browser.find_element(By.CSS_SELECTOR, "#picture img").get_attribute("src")
        with urllib.request.urlopen(src, timeout=10) as response:
            return np.asarray(Image.open(__import__("io").BytesIO(response.read())).convert("RGB"))

    def table_rows() -> int:
        return len(browser.find_elements(By.CSS_SELECTOR, "#table [role=row][data-index]"))  # body rows (virtual)

    try:
        browser.get(served_app)
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#image-in input[type=file]"), "the upload box")
        assert "held-out shapes 1" in browser.page_source and "Grace Hopper" in browser.page_source  # examples

        # No weights given: the page says how to get some; an upload says so too; then the demo model's button.
        assert "No model loaded." in text("no-model") and "focus-detr demo" in text("no-model")
        assert "runs/demo/model_final.pth" in text("no-model")
        browser.find_element(By.CSS_SELECTOR, "#image-in input[type=file]").send_keys(str(shapes[0]))
        wait_for(lambda: "load the demo-trained model with the button" in text("message"), "the no-model message")
        screenshot("0_no_model")
        browser.find_element(By.ID, "load-demo").click()
        wait_for(lambda: "weights file runs/demo/model_final.pth" in text("model-line"), "the demo model loaded")
        assert not any(e.is_displayed() for e in browser.find_elements(By.ID, "no-model"))

        # Upload: the picture, the summary with tokens kept and the measured time.
        browser.find_element(By.CSS_SELECTOR, "#image-in input[type=file]").send_keys(str(shapes[0]))
        wait_for(lambda: "tokens kept" in text("summary"), "the summary after the upload")
        summary = text("summary")
        assert f"in {shapes[0].name} (256×192 pixels" in summary and "model forward" in summary
        valid = int(summary.split(" of ")[1].split(" tokens")[0].replace(",", ""))
        assert f"{int(0.5 * valid) + 1} of {valid} tokens kept" in summary

        # Threshold 0: all 100 detections drawn (the table scrolls: only its visible rows are in the page);
        # threshold 1: the plain picture and no rows.
        set_number("threshold", 0.0)
        wait_for(lambda: "100 detections with score ≥ 0.00" in text("summary"), "the summary at threshold 0")
        wait_for(lambda: table_rows() >= 5, "table rows at threshold 0")
        with_boxes = picture_pixels()
        screenshot("1_detections")
        set_number("threshold", 1.0)
        wait_for(lambda: "0 detections with score ≥ 1.00" in text("summary"), "the summary at threshold 1")
        wait_for(lambda: table_rows() == 0, "an empty table at threshold 1")
        plain = picture_pixels()
        assert plain.shape == (192, 256, 3) and with_boxes.shape[0] > 192  # a legend strip below: untagged boxes
        assert np.abs(with_boxes[:192, :256].astype(int) - plain.astype(int)).max() > 100  # coloured boxes
        # A threshold (slider step 0.01) that leaves a few detections of this random model: rows and json agree.
        threshold = float(np.floor(100 * float(analysis.detections.scores[2])) / 100)
        shown = int((analysis.detections.scores >= threshold).sum())
        set_number("threshold", threshold)
        wait_for(lambda: f"{shown} detection" in text("summary") and f"score ≥ {threshold:.2f}" in text("summary"),
                 f"{shown} detections at threshold {threshold}")
        wait_for(lambda: table_rows() == shown, f"{shown} table rows at threshold {threshold}")
        coco = browser.find_element(By.CSS_SELECTOR, "#coco-json a").get_attribute("href")
        with urllib.request.urlopen(coco, timeout=10) as response:
            records = json.loads(response.read())
        assert len(records) == shown and all(r["score"] >= threshold for r in records)

        # Keep ratio 0.2: the model runs again and keeps int(0.2 * valid) + 1 tokens.
        expected = f"{int(0.2 * valid) + 1} of {valid} tokens kept"
        # Under a loaded parallel test run the number box sometimes drops the first commit (seen twice in CI);
        # a person would type it again: up to three tries, then the same failure as before.
        for attempt in range(3):
            set_number("keep-ratio", 0.2)
            try:
                WebDriverWait(browser, 30, poll_frequency=0.2).until(lambda _: expected in text("summary"))
                break
            except Exception:
                if attempt == 2:
                    wait_for(lambda: expected in text("summary"), "the tokens kept at keep ratio 0.2", seconds=1)
        assert "Keep ratio 0.20" in text("summary")
        screenshot("2_keep_ratio")

        # The focus maps: four levels, the layer slider, OESM tokens, each with its caption.
        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Focus maps')]").click()
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#foreground img")) == 4, "4 foreground maps")
        for caption in ("caption-foreground", "caption-kept", "caption-oesm"):
            assert text(caption).count(".") >= 1 and len(text(caption)) > 80
        wait_for(lambda: "layer 1 of 2" in text("kept-note"), "layer 1's note")
        assert browser.find_elements(By.CSS_SELECTOR, "#kept img") and browser.find_elements(By.CSS_SELECTOR,
                                                                                              "#oesm img")
        set_number("layer", 2)
        wait_for(lambda: "layer 2 of 2" in text("kept-note") and "layer 2:" in text("oesm-note"), "layer 2's maps")
        screenshot("3_focus_maps")

        # A file that is not an image: a message in the page, and the app keeps serving.
        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Detections')]").click()
        notes = tmp_path / "notes.png"
        notes.write_text("this is not an image\n")
        browser.find_element(By.CSS_SELECTOR, "#image-in input[type=file]").send_keys(str(notes))
        wait_for(lambda: "not an image file" in text("message"), "the error message")
        assert text("message").startswith("Could not use this input: notes.png: not an image file")
        assert "Traceback" not in browser.page_source
        screenshot("4_not_an_image")
        browser.find_element(By.CSS_SELECTOR, "#image-in input[type=file]").send_keys(str(shapes[1]))
        wait_for(lambda: f"in {shapes[1].name}" in text("summary"), "the next upload after the error")
        assert not any(e.is_displayed() and e.text for e in browser.find_elements(By.ID, "message"))
    finally:
        browser.quit()
    # The upload limit is the server's too (not only the page's): a bigger file is refused with HTTP 413.
    assert _upload(served_app, 1000) == 200
    assert _upload(served_app, core.MAX_UPLOAD_BYTES + 1) == 413
    print(f"browser part: {time.monotonic() - started:.1f} s", file=sys.stderr)
