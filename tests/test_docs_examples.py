"""The shell examples of README.md and docs/*.md (and of every command's --help) work as written.

1. Every `focus-detr ...` command in the docs (```bash blocks, `$ ` lines of ```text blocks, inline `focus-detr
   ...` spans, and the focus-detr part of `torchrun ... -m focus_detr.cli.main ...`) is parsed by the real
   argument parser: complete commands must parse; fragments (inline spans, synopses with [OPTIONS], commands
   elided with `...`) must name only options the command has.
2. Every example that needs no downloaded weights, GPU, torchrun, camera, network or user's own data is run,
   in document order, in a fresh folder per document that holds the inputs the docs assume (photos, a
   trained-looking `runs/demo/model_final.pth`, ...), on tiny data through the explicit SHRINK and
   REWRITES tables below. The others are listed in SKIP with the reason; a rule that no longer matches any
   example fails, so the table stays true.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import focus_detr
from focus_detr.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Examples not run, by reason (a regex on the command as written; first match wins).
SKIP: list[tuple[str, str]] = [
    (r"^make (demo|test)\b", "the whole demo (~15 min) or test suite; tests/cli/test_cli_train.py runs the demo small"),
    (r"^pip install", "installs packages from the network"),
    (r"^torchrun ", "needs torchrun with several processes (tests/engine/test_ddp.py); its arguments are parse-checked"),
    (r"/data/coco|--data coco\b", "needs the COCO dataset"),
    (r"focus_detr_r50_4scale_\d+ep|focus_r50_36ep\.pth|\br50\.pth|resnet50-0676ba61|--backbone-weights imagenet",
     "needs downloaded official weights"),
    (r"my_yolo_export|\bmy/|my_data|my_dataset|unnamed_10_classes|coco_model\.pth",
     "needs the user's own dataset or weights"),
    (r"https?://|rtsp://", "needs the network"),
    (r"camera:\d", "needs a camera"),
    (r"clip\.mp4", "needs a video file and the optional PyAV (tests/inference/test_inputs.py covers videos)"),
    (r"^focus-detr export ", "ONNX export takes 1-2.5 min on 2 cores (tests/export/test_onnx.py runs it)"),
    (r"^focus-detr compare-modes ", "trains 15 models (about an hour of CPU); tests/engine/test_compare_modes.py runs it tiny"),
    (r"^focus-detr app\b", "starts a web server that runs until stopped; tests/app/test_app.py drives it in a browser"),
    (r"^focus-detr benchmark --preset r50_4scale", "minutes of CPU for R50 at 800x1333 (tests/bench/test_bench.py runs tiny)"),
]

# Flags set to tiny values on the commands that are run: {old value (None: flag absent, "*": any): new value}.
SHRINK: list[tuple[str, str, dict[str | None, str]]] = [
    ("make-data", "--train", {"*": "4", None: "4"}),
    ("make-data", "--val", {"*": "2", None: "2"}),
    ("make-data", "--image-size", {None: "80,96"}),
    ("train", "--max-iters", {"20": "1", "40": "2", "2000": "1", "3000": "2", "5200": "1", None: "1"}),
    ("train", "--lr-steps", {"4420": "1"}),
    ("train", "--eval-every", {"1000": "1", "250": "1"}),
    ("train", "--max-eval-images", {"50": "2"}),
    ("train", "--batch-size", {"*": "2"}),
    ("train", "--train-scales", {"192": "64", None: "64"}),
    ("train", "--workers", {None: "0"}),
]
# Text rewrites that follow from SHRINK or from the prepared folder: (regex, replacement, why).
REWRITES: list[tuple[str, str, str]] = [
    (r"checkpoint_000(5|2)000\.pth", "checkpoint_0000001.pth", "the shrunk runs end at iteration 1"),
    (r"test_short_side=192", "test_short_side=64", "the shrunk training scale"),
    (r"^(focus-detr convert focus_detr_tiny_official\.pth) weights/tiny\.pt",
     r"\1 weights/tiny_converted.pt", "weights/tiny.pt was prepared for the predict example above it"),
]
# Examples whose documented exit code is not 0.
EXPECTED_EXIT = {"focus-detr predict weights/tiny.pt mixed/ --out runs/mixed": 1}


@dataclass(frozen=True)
class Example:
    file: str
    line: int
    kind: str  # "block" (```bash), "prompt" (`$ ` in ```text), "inline" (`focus-detr ...` in prose)
    text: str
    output: tuple[str, ...] = ()  # prompt examples: the output the docs show

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def extract(path: Path) -> list[Example]:
    examples: list[Example] = []
    lang: str | None = None
    pending, start = "", 0
    prompt: list | None = None
    name = str(path.relative_to(REPO))
    for no, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence:
            if prompt:
                examples.append(Example(name, prompt[0], "prompt", prompt[1], tuple(prompt[2])))
            prompt = None
            lang = None if lang is not None else (fence.group(1) or "plain")
            continue
        if lang in ("bash", "sh", "shell", "console"):
            stripped = line.strip()
            pending, start = (pending + " " + stripped, start) if pending else (stripped, no)
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            if pending and not pending.startswith("#"):
                examples.append(Example(name, start, "block", pending))
            pending = ""
        elif lang == "text":
            if line.startswith("$ "):
                if prompt:
                    examples.append(Example(name, prompt[0], "prompt", prompt[1], tuple(prompt[2])))
                prompt = [no, line[2:].strip(), []]
            elif prompt:
                prompt[2].append(line)
        elif lang is None:
            examples += [Example(name, no, "inline", span) for span in re.findall(r"`(focus-detr [^`]+)`", line)]
    return examples


ALL = [ex for doc in DOCS for ex in extract(doc)]


def focus_argv(text: str) -> list[str] | None:
    """The arguments after ``focus-detr`` (also under torchrun), without comments and redirections."""
    tokens = [t for t in shlex.split(text, comments=True) if not re.match(r"^\d?>", t)]
    if tokens[:1] == ["focus-detr"]:
        return tokens[1:]
    if tokens[:1] == ["torchrun"] and "focus_detr.cli.main" in tokens:
        return tokens[tokens.index("focus_detr.cli.main") + 1:]
    return None


def skip_reason(ex: Example) -> str | None:
    if ex.kind == "inline":
        return "a fragment in prose (parse-checked)"
    argv = focus_argv(ex.text)
    if argv is not None and is_fragment(argv):
        return "a synopsis or an elided command (parse-checked)"
    for pattern, reason in SKIP:
        if re.search(pattern, ex.text):
            return reason
    return None


def is_fragment(argv: list[str]) -> bool:
    """A synopsis (``[--flag X]``, ``WEIGHTS``) or an elided command (``...``)."""
    return any("..." in t or t.startswith("[") or re.fullmatch(r"[A-Z][A-Z_|]+", t) for t in argv)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def check_parses(argv: list[str], fragment: bool, where: str) -> None:
    if not argv or argv[0].startswith("-"):  # top-level: focus-detr --help / --version
        assert set(argv) <= {"--help", "-h", "--version", "--debug"}, where
        return
    commands = subparsers()
    assert argv[0] in commands, f"{where}: unknown command {argv[0]!r}"
    if fragment:
        known = commands[argv[0]]._option_string_actions
        for token in argv[1:]:
            flag = token.strip("[]").split("=")[0]
            if flag.startswith("--") and flag not in known:
                pytest.fail(f"{where}: {argv[0]} has no option {flag}")
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"{where}: argparse refused it (exit {e.code})"


@pytest.mark.parametrize("example", [ex for ex in ALL if focus_argv(ex.text) is not None], ids=str)
def test_docs_command_parses(example: Example, capsys) -> None:
    argv = focus_argv(example.text)
    assert argv is not None
    check_parses(argv, example.kind == "inline" or is_fragment(argv), str(example))
    capsys.readouterr()


def help_examples() -> list[tuple[str, str]]:
    found = []
    for name, parser in subparsers().items():
        pending = ""
        for line in (parser.epilog or "").splitlines():
            text = (pending + " " + line.strip()) if pending else line.strip()
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            pending = ""
            if text.startswith(("focus-detr ", "torchrun ")):
                found.append((name, text))
    return found


@pytest.mark.parametrize("command, text", help_examples(), ids=lambda v: v)
def test_help_examples_parse(command: str, text: str, capsys) -> None:
    argv = focus_argv(text)
    assert argv is not None, text
    check_parses(argv, is_fragment(argv), f"{command} --help: {text}")
    capsys.readouterr()


def test_examples_were_found_and_every_skip_rule_is_used() -> None:
    kinds = {ex.kind for ex in ALL}
    assert kinds == {"block", "prompt", "inline"}, kinds
    assert len(help_examples()) >= 20
    used = {reason for ex in ALL if (reason := skip_reason(ex))}
    stale = [pattern for pattern, reason in SKIP if reason not in used]
    assert not stale, f"SKIP rules that match no example any more: {stale}"
    for command, flag, _ in SHRINK:
        assert any((argv := focus_argv(ex.text)) and argv[0] == command for ex in ALL), (command, flag)
    for pattern, _, why in REWRITES:
        assert any(re.search(pattern, ex.text) for ex in ALL), why


# --------------------------------------------------------------------------------------------------
# Running them


def shrink(argv: list[str]) -> list[str]:
    argv = list(argv)
    for command, flag, values in SHRINK:
        if argv[0] != command:
            continue
        if flag in argv:
            i = argv.index(flag) + 1
            new = values.get(argv[i], values.get("*"))
            if new is not None:
                argv[i] = new
        elif None in values:
            argv += [flag, values[None]]
    return argv


def prepare(folder: Path) -> None:
    """The inputs the docs take for granted: pictures, weights files, a folder with unreadable files."""
    from cli_utils import make_picture
    from weights_utils import official_checkpoint

    for rel, seed in [("photo.jpg", 1), ("image.jpg", 2), ("photos/a.jpg", 3), ("photos/b.png", 4),
                      ("mixed/good.jpg", 5)]:
        make_picture(folder / rel, (96, 128), seed)
    (folder / "mixed" / "empty.png").write_bytes(b"")
    (folder / "mixed" / "letter.jpg").write_text("Dear reader,\n")
    (folder / "mixed" / "corrupt.jpg").write_bytes((folder / "photo.jpg").read_bytes()[:200])
    torch.manual_seed(0)
    model = focus_detr.build_model("tiny")
    for rel in ("runs/demo/model_final.pth", "weights/tiny.pt"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        focus_detr.save(model, folder / rel)
    torch.save(official_checkpoint(model), folder / "focus_detr_tiny_official.pth")


def runnable(doc: Path) -> list[Example]:
    name = str(doc.relative_to(REPO))
    return [ex for ex in ALL if ex.file == name and skip_reason(ex) is None]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_examples_run(doc: Path, tmp_path: Path, monkeypatch, capsys, one_torch_thread) -> None:
    examples = runnable(doc)
    assert examples, f"{doc.name}: no runnable example"
    prepare(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FOCUS_DETR_HOME", str(tmp_path / "cache"))  # `models` must not look at the real cache
    for ex in examples:
        text = ex.text
        for pattern, replacement, _ in REWRITES:
            text = re.sub(pattern, replacement, text)
        argv = focus_argv(text)
        if argv is None:  # e.g. python -c "..."
            tokens = shlex.split(text, comments=True)
            assert tokens[0] == "python", f"{ex}: no rule for this command"
            proc = subprocess.run([sys.executable, *tokens[1:]], capture_output=True, text=True, timeout=120,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
            code, out = proc.returncode, proc.stdout + proc.stderr
        else:
            argv = shrink(argv)
            code = main(argv)
            captured = capsys.readouterr()
            out = captured.out + captured.err
        expected = EXPECTED_EXIT.get(ex.text, 0)
        assert code == expected, f"{ex}\n  ran: {text}\n  exit {code}, expected {expected}\n{out[-3000:]}"
        # The output the docs show: each line's label ("results:", "model:") is in the real output.
        for line in ex.output:
            label = re.match(r"^([a-z][a-z ]*):\s", line)
            if label:
                assert label.group(1) + ":" in out, f"{ex}: the docs show {line!r}; the output was\n{out}"
