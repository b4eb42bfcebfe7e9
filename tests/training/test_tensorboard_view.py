"""The TensorBoard a user opens, checked in TensorBoard itself: a real `mor train` run, the real
TensorBoard server (its HTTP API, which renders text with TensorBoard's own markdown renderer), and
its pages in headless Chromium. MOR_SCREENSHOTS=DIR keeps the screenshots for a person to look at.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mor_dist.training.depth_view import depth_colours, depth_markdown
from tests.training.conftest import mor_env, run_mor, tiny_overrides

CONFIG = "configs/tiny/mor.yaml"
NR = 3  # recursions of the tiny MoR
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless in a closed network: without the background-networking flags its connections are refused.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="module")
def board(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "view"
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, run_dir, train__steps=4, train__eval_interval=2)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    port, log = _free_port(), run_dir.parent / "tensorboard.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "tensorboard"),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=mor_env())
    url = f"http://localhost:{port}/"
    try:
        runs = _wait_for(lambda: _get(url, "data/runs") if proc.poll() is None else ["exited"], 120)
        assert runs and runs != ["exited"], log.read_text()
        yield SimpleNamespace(url=url, run=runs[0], runs=runs, run_dir=run_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _get(url: str, path: str, raw: bool = False):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        body = r.read()
    return body if raw else json.loads(body)


def _wait_for(fetch, timeout: float):
    """TensorBoard starts and loads event files in the background: poll until there is something."""
    end = time.time() + timeout
    while True:
        try:
            value = fetch()
        except OSError:  # not listening yet
            value = None
        if value or time.time() > end:
            return value
        time.sleep(0.5)


def test_run_name_groups_and_descriptions(board):
    assert board.runs == ["view"]  # the run folder's name, not "."
    tags = _wait_for(lambda: _get(board.url, "data/plugin/scalars/tags").get("view", {}), 30)
    groups = sorted({t.split("/")[0] for t in tags})
    assert groups[:2] == ["train", "train_routing"], groups  # TensorBoard opens the first two
    for tag in ("train/loss", "train/param_norm", "train/loss_vs_tokens", "train_system/step_time_s",
                "train_system/tokens_per_s_per_device", "train_system/mfu", "train_system/cpu_rss_gib",
                "val/loss", "val/loss_topk", "val/routing_gap", "val/depth_agreement"):
        assert tag in tags, (tag, sorted(tags))
    assert not [t for t in tags if "active_frac" in t or "router_bias" in t]  # flat here: not plotted
    for tag in ("train_routing/causal_agreement/r3", "train_routing/dead_tokens/r3", "val/routing_gap"):
        assert "causal" in tags[tag]["description"], (tag, tags[tag])


def test_depth_text_renders_cleanly(board):
    """Through the server, i.e. TensorBoard's markdown renderer and sanitizer: a table of depth
    shares, and every sample token followed by its depth, no HTML tag left as text."""
    (entry,) = [e for e in _get(board.url, f"data/plugin/text/text?run={board.run}&tag=val/depths") if e["step"] == 4]
    html = entry["text"]
    assert "&lt;sub" not in html and "<sub" not in html, html[:500]
    assert "<table>" in html and "top-k (training)" in html and "causal (inference)" in html
    spans = re.findall(r"</code>([\u2070\u00b9\u00b2\u00b3])", html)
    assert len(spans) == html.count("<code>") > 0
    config = _get(board.url, f"data/plugin/text/text?run={board.run}&tag=config/resolved")[0]["text"]
    assert "recursions: 3" in config and "<pre>" in config


def test_markdown_of_awkward_tokens():
    """Backticks, newlines, tabs, empty and space-only tokens stay one code span each."""
    from tensorboard.plugin_util import markdown_to_safe_html

    pieces = ["def", " f", "(`x`", ")\n", "\tpass", "", "   ", "<b>"]
    html = markdown_to_safe_html(depth_markdown([(pieces, [0, 1, 2, 3, 3, 1, 2, 0])], 3, {}, "**depths**"))
    assert html.count("<code>") == len(pieces) and "<br" in html
    assert "&lt;b&gt;" in html  # a token that looks like HTML is shown as text, inside its span


def test_depth_image_fits_a_card(board):
    (entry,) = [e for e in _get(board.url, f"data/plugin/images/images?run={board.run}&tag=val/depth_map")
                if e["step"] == 4]
    png = _get(board.url, "data/plugin/images/individualImage?" + entry["query"], raw=True)
    img = np.asarray(Image.open(io.BytesIO(png)))
    h, w, _ = img.shape
    assert 300 <= w <= 400 and 100 <= h <= 220, (w, h)  # about the card's box: shown unscaled
    present = {d for d, c in enumerate(depth_colours(NR)) if (img == c).all(axis=-1).sum() > 20}
    assert len(present) >= 2, present  # tokens on boxes of their depths' colours


def test_depth_histograms(board):
    tokens = 2 * 4 * 32  # eval_batches x micro-batch x seq_len; a step: global batch x seq_len
    for tag, expected in (("val/depth_causal", tokens), ("val/depth_topk", tokens), ("train_routing/depth", 8 * 32)):
        series = _get(board.url, f"data/plugin/histograms/histograms?run={board.run}&tag={tag}")
        _, step, buckets = series[-1]
        assert step == 4
        assert min(b[0] for b in buckets) >= -0.5 and max(b[1] for b in buckets) <= NR + 0.5
        assert sum(b[2] for b in buckets) == pytest.approx(expected), (tag, buckets)


def _screenshot(url: str, path: Path, profile: Path) -> np.ndarray:
    r = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1100",
                        "--virtual-time-budget=15000", f"--screenshot={path}", url],
                       capture_output=True, text=True, timeout=120)
    assert path.is_file(), r.stderr[-2000:]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium): no browser check")
def test_pages_in_a_browser(board, tmp_path):
    """The depth map in the time series page, the TEXT tab and the dashboard as a person opens it."""
    out = Path(os.environ.get("MOR_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    # forceSVG: charts drawn as SVG (headless WebGL leaves some of them blank).
    for name, page in (("text", "#text&tagFilter=val%2Fdepths"), ("timeseries", "?forceSVG=true#timeseries")):
        _screenshot(board.url + page, out / f"{name}.png", tmp_path / name)
    # A card is drawn once its data arrived; on a loaded machine that can miss the time budget.
    for attempt in range(3):
        shot = _screenshot(board.url + "?tagFilter=depth_map#timeseries", out / "depth_map.png",
                           tmp_path / f"depth_map{attempt}")
        # The picture in the page: its depth colours, unscaled and unblended, over many pixels.
        present = {d for d, c in enumerate(depth_colours(NR)) if (shot == c).all(axis=-1).sum() > 50}
        if len(present) >= 2:
            break
    assert len(present) >= 2, present
