"""The self-contained HTML review report (torch-free; marker `runtime`): structure, risk order, escaping,
thumbnails and their cap, CSV-style values, offline-only content, and filtering in a real headless browser."""

from __future__ import annotations

import base64
import csv
import hashlib
import random
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import cadbcnn_runtime  # noqa: F401 — first, as in any user process: sets OpenCV's pixel limit before cv2 loads
import cv2
import numpy as np
import pytest

from cadbcnn_runtime.classifier import Prediction
from cadbcnn_runtime.errors import ArgumentError, OutputError
from cadbcnn_runtime.folder import columns, error_row, ok_row
from cadbcnn_runtime.report_html import write_html_report

pytestmark = pytest.mark.runtime

CLASSES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
HOSTILE = "<script>alert(1)</script>.jpg"


# ---------------------------------------------------------------- helpers

def pred(label: str, conf: float, *, review: bool = False, ood: bool | None = None, score: float | None = None,
         blank: bool | None = None) -> Prediction:
    rest = (1.0 - conf) / (len(CLASSES) - 1)
    probs = {c: (conf if c == label else rest) for c in CLASSES}
    return Prediction(label, CLASSES.index(label), conf, probs, review or bool(ood) or bool(blank),
                      ood_score=(score if score is not None else 0.1) if ood is not None else None,
                      out_of_distribution=bool(ood), content_score=None if blank is None else 0.5,
                      low_content=bool(blank))


def scenario() -> tuple[list[dict], list[str]]:
    """Rows of every kind (shuffled) and the expected id order of the review section."""
    review = [  # expected risk order
        ("blank_a.png", pred("Pro-B", 0.40, blank=True, ood=False)),
        ("blank_b.png", pred("Benign", 0.90, blank=True, ood=True, score=0.99)),
        ("ood_hi.png", pred("Pro-B", 0.95, ood=True, score=0.97, blank=False)),
        ("ood_lo.png", pred("Pre-B", 0.30, ood=True, score=0.80, blank=False)),
        ("low_1.png", pred("Pro-B", 0.41, review=True, ood=False, blank=False)),
        ("low_2.png", pred("Early Pre-B", 0.55, review=True, ood=False, blank=False)),
        ("low_3.png", pred("Pro-B", 0.71, review=True, ood=False, blank=False)),
    ]
    rest = [(f"z_ok_{i}.png", pred(CLASSES[i % 4], 0.9 + i / 100, ood=False, score=0.2, blank=False))
            for i in range(6)]
    rows = [ok_row(p, x) for p, x in review + rest]
    rows += [error_row("bad_b.png", "bad_b.png: not a decodable image (truncated)", CLASSES),
             error_row("bad_a.png", "bad_a.png: file is empty & <useless>", CLASSES)]
    order = [p for p, _ in review]
    random.Random(3).shuffle(rows)
    return rows, order


class Report(HTMLParser):
    """Collects result rows (``tr.row``), every src/href, scripts and visible text of a report."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._row: dict | None = None
        self._in_script = False
        self._in_path = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "poster")]
        if tag == "tr" and "row" in (a.get("class") or "").split():
            self._row = {"attrs": a, "text": "", "imgs": [], "path": ""}
            self.rows.append(self._row)
        elif tag == "td" and self._row is not None and a.get("class") == "path":
            self._in_path = True
        elif tag == "img" and self._row is not None:
            self._row["imgs"].append(a.get("src") or "")
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._in_path = False
        elif tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        elif self._row is not None:
            self._row["text"] += data + " "
            if self._in_path:
                self._row["path"] += data


def parse(path: Path) -> tuple[Report, str]:
    text = path.read_bytes().decode("utf-8")  # strict: the file must be valid UTF-8
    p = Report()
    p.feed(text)
    p.close()
    return p, text


def path_of(row: dict) -> str:
    return row["path"]


def write_image(path: Path, h: int = 120, w: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def chromium_run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage", *args]
    res = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if res.returncode != 0:  # one retry: a browser that failed to start (busy machine) is not the report's fault
        res = subprocess.run(cmd, capture_output=True, timeout=timeout)
    return res


# ---------------------------------------------------------------- structure and order

def test_every_row_once_and_review_rows_first_in_risk_order(tmp_path):
    rows, expected_review = scenario()
    out = write_html_report(tmp_path / "r.html", rows, class_names=CLASSES)
    rep, _ = parse(out)
    ids = [r["attrs"]["id"] for r in rep.rows]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(len(rows)))  # every input row exactly once
    assert len(set(ids)) == len(ids)
    for r in rep.rows:
        i = int(r["attrs"]["id"].split("-")[1])
        assert path_of(r) == rows[i]["path"]

    paths = [path_of(r) for r in rep.rows]
    flags = [r["attrs"]["data-flag"] for r in rep.rows]
    n = len(expected_review)
    assert paths[:n] == expected_review
    assert all("review" in f.split() for f in flags[:n])
    assert paths[n:n + 2] == ["bad_a.png", "bad_b.png"] and flags[n:n + 2] == ["error", "error"]
    assert paths[n + 2:] == sorted(paths[n + 2:]) and set(flags[n + 2:]) == {"none"}
    assert flags[:n] == ["review blank", "review ood blank", "review ood", "review ood",
                         "review lowconf", "review lowconf", "review lowconf"]

    by_path = {path_of(r): r for r in rep.rows}
    assert by_path["low_3.png"]["attrs"]["data-class"] == "Pro-B"
    assert "confidence 0.710 below the review threshold" in by_path["low_3.png"]["text"]
    assert "out of distribution (score 0.970)" in by_path["ood_hi.png"]["text"]
    assert "blank or near-uniform field" in by_path["blank_a.png"]["text"]
    assert "below the review threshold" not in by_path["ood_lo.png"]["text"]
    # all class probabilities are listed
    assert all(c in by_path["low_1.png"]["text"] for c in CLASSES) and "0.410" in by_path["low_1.png"]["text"]


def test_summary_and_error_messages(tmp_path):
    rows, _ = scenario()
    out = write_html_report(tmp_path / "r.html", rows, class_names=CLASSES, model_info="model v1 <test>",
                            title="Run 7 & co")
    rep, text = parse(out)
    errors = {path_of(r): r["text"] for r in rep.rows if r["attrs"]["data-flag"] == "error"}
    assert "not a decodable image (truncated)" in errors["bad_b.png"]
    assert "file is empty & <useless>" in errors["bad_a.png"]  # parsed text: escaped in the file
    assert "file is empty &amp; &lt;useless&gt;" in text
    assert all(r["attrs"]["data-class"] == "" for r in rep.rows if r["attrs"]["data-flag"] == "error")
    assert "model v1 &lt;test&gt;" in text and "<title>Run 7 &amp; co</title>" in text
    assert re.search(r'<div class="n">15</div><div class="k">total</div>', text)
    assert re.search(r'<div class="n">7</div><div class="k">needs review</div>', text)
    assert re.search(r'<div class="n">3</div><div class="k">out of distribution</div>', text)
    assert re.search(r'<div class="n">2</div><div class="k">blank fields</div>', text)
    assert re.search(r'<div class="n">2</div><div class="k">errors</div>', text)
    assert "Pro-B: <b>5</b>" in text and "Generated " in text
    assert "unlike training images</div>" not in text and "low review score</div>" not in text  # no such checks


def test_offline_only_and_csp_allows_exactly_the_inline_script(tmp_path):
    img = write_image(tmp_path / "a.png")
    rows = [ok_row("a.png", pred("Pro-B", 0.5, review=True))]
    out = write_html_report(tmp_path / "r.html", rows, class_names=CLASSES, source_of=lambda k: tmp_path / k)
    rep, text = parse(out)
    assert "http://" not in text and "https://" not in text
    assert rep.urls, "expected at least the thumbnail and summary links"
    for url in rep.urls:
        assert url.startswith(("data:", "#")) and "//" not in url.split(",")[0], url
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert len(rep.scripts) == 1 and img.exists()
    digest = base64.b64encode(hashlib.sha256(rep.scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in text


# ---------------------------------------------------------------- thumbnails

def test_thumbnails_review_first_capped_and_bad_sources_never_crash(tmp_path):
    names = [f"img_{i}.png" for i in range(8)]
    for i, n in enumerate(names):
        write_image(tmp_path / n, h=120, w=200, seed=i)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [ok_row(n, pred("Benign", 0.95)) for n in names]
    rows[6] = ok_row(names[6], pred("Pre-B", 0.5, review=True))
    rows[7] = ok_row(names[7], pred("Pre-B", 0.4, review=True))
    rows += [ok_row("broken.png", pred("Pro-B", 0.3, review=True)),
             ok_row("missing.png", pred("Pro-B", 0.35, review=True)),
             ok_row("raises.png", pred("Pro-B", 0.36, review=True)),
             ok_row("as_bytes.png", pred("Benign", 0.99)),
             ok_row("as_array.png", pred("Benign", 0.99))]

    def source_of(key: str):
        if key == "missing.png":
            return None
        if key == "raises.png":
            raise KeyError(key)
        if key == "as_bytes.png":
            return (tmp_path / names[0]).read_bytes()
        if key == "as_array.png":
            return np.zeros((30, 10, 3), np.uint8)
        return tmp_path / key

    out = write_html_report(tmp_path / "r.html", rows, class_names=CLASSES, source_of=source_of,
                            max_thumbnails=4, thumb_px=48)
    rep, text = parse(out)
    by_path = {path_of(r): r for r in rep.rows}
    with_img = [path_of(r) for r in rep.rows if r["imgs"]]
    # review rows first (risk order: 0.3 broken, 0.35 missing, 0.36 raises, 0.4, 0.5), then the rest by path
    assert with_img == ["img_7.png", "img_6.png", "as_array.png", "as_bytes.png"]
    assert "no thumbnail" in by_path["broken.png"]["text"] and not by_path["broken.png"]["imgs"]
    assert re.search(r'<span class="nothumb" title="[^"]*broken\.png[^"]*">no thumbnail', text)
    assert "no image source" in by_path["missing.png"]["text"]
    assert "no thumbnail" in by_path["raises.png"]["text"]
    omitted = [p for p, r in by_path.items() if "thumbnail omitted: more than 4 images" in r["text"]]
    assert sorted(omitted) == [f"img_{i}.png" for i in range(6)]
    assert "6 of the rows show no thumbnail" in text and "at most 4 images" in text

    src = by_path["img_7.png"]["imgs"][0]
    assert src.startswith("data:image/jpeg;base64,")
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == 48 and thumb.shape[:2] == (29, 48)  # INTER_AREA downscale, aspect kept
    small = by_path["as_array.png"]["imgs"][0]
    tiny = cv2.imdecode(np.frombuffer(base64.b64decode(small.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert tiny.shape[:2] == (30, 10)  # never scaled up


def test_no_source_means_no_thumbnail_column(tmp_path):
    out = write_html_report(tmp_path / "r.html", [ok_row("a.png", pred("Benign", 0.9))], class_names=CLASSES)
    rep, text = parse(out)
    assert not rep.rows[0]["imgs"] and "<th>Image</th>" not in text and "thumbnail omitted" not in text


# ---------------------------------------------------------------- escaping and values

def test_hostile_and_undecodable_file_names_are_escaped(tmp_path):
    names = [HOSTILE, 'q"uote\'s & <b>.png', "bad_\udcff_byte.png", "lone_\ud800.png", "ctl_\x07.png"]
    rows = [ok_row(n, pred("Pro-B", 0.5, review=True)) for n in names]
    rows.append(error_row("<img src=x onerror=alert(2)>.png", "<img src=x onerror=alert(2)>: bad", CLASSES))
    rows.append(ok_row("label.png", pred("Pro-B", 0.9)) | {"label": '"><script>alert(3)</script>'})
    out = write_html_report(tmp_path / "r.html", rows, class_names=CLASSES, source_of=lambda k: tmp_path / k,
                            title="<script>alert(4)</script>")
    rep, text = parse(out)
    assert len(rep.scripts) == 1 and "alert" not in rep.scripts[0]
    assert "<script>alert" not in text and "<img src=x" not in text and "<b>.png" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in text
    assert "q&quot;uote&#x27;s &amp; &lt;b&gt;.png" in text
    texts = " ".join(r["text"] for r in rep.rows)
    assert HOSTILE in texts and "bad_\\xff_byte.png" in texts and "lone_\\ud800.png" in texts
    assert "ctl_\\x07.png" in texts
    assert len(rep.rows) == len(rows)
    assert [u for u in rep.urls if not u.startswith(("data:", "#"))] == []


def test_csv_string_values_match_native_values(tmp_path):
    rows, expected_review = scenario()
    cols = columns(CLASSES, ood=True, quality=True)
    with open(tmp_path / "r.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[0]["needs_review"] in ("True", "False", "")
    native, _ = parse(write_html_report(tmp_path / "native.html", rows, class_names=CLASSES))
    from_csv, text = parse(write_html_report(tmp_path / "csv.html", csv_rows, class_names=CLASSES))
    strip = [(r["attrs"], re.sub(r"\s+", " ", r["text"])) for r in native.rows]
    assert [(r["attrs"], re.sub(r"\s+", " ", r["text"])) for r in from_csv.rows] == strip
    assert [path_of(r) for r in from_csv.rows[:len(expected_review)]] == expected_review
    assert re.search(r'<div class="n">3</div><div class="k">out of distribution</div>', text)


def test_atomic_overwrite_and_bad_arguments(tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old")
    write_html_report(out, [ok_row("a.png", pred("Benign", 0.9))], class_names=CLASSES)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no temp file left behind
    with pytest.raises(ArgumentError):
        write_html_report(out, [], class_names=CLASSES, max_thumbnails=-1)
    with pytest.raises(ArgumentError):
        write_html_report(out, [], class_names=CLASSES, thumb_px=0)
    with pytest.raises(OutputError):
        write_html_report(tmp_path, [], class_names=CLASSES)
    with pytest.raises(OutputError):
        write_html_report(tmp_path / "no" / "such" / "r.html", [], class_names=CLASSES)
    empty, _ = parse(write_html_report(out, [], class_names=CLASSES))
    assert empty.rows == []


# ---------------------------------------------------------------- a real browser

def visible_rows(dom: str) -> list[dict]:
    rep = Report()
    rep.feed(dom)
    return [r for r in rep.rows if "hidden" not in r["attrs"] and "display:none" not in
            (r["attrs"].get("style") or "").replace(" ", "")]


def test_headless_chromium_applies_hash_filters_and_renders(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    rows, _ = scenario()
    for i, r in enumerate(rows):
        if r["status"] == "ok":
            write_image(tmp_path / r["path"], seed=i)
    out = write_html_report(tmp_path / "r.html", rows, class_names=CLASSES, source_of=lambda k: tmp_path / k)
    profile = tmp_path / "profile"
    t0 = time.perf_counter()

    def dump(fragment: str) -> list[dict]:
        res = chromium_run([f"--user-data-dir={profile}", "--dump-dom", out.as_uri() + fragment])
        assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
        dom = res.stdout.decode("utf-8")
        assert 'id="row-0"' in dom
        return visible_rows(dom)

    shown = dump("#class=Pro-B&flag=review")
    assert sorted(path_of(r) for r in shown) == ["blank_a.png", "low_1.png", "low_3.png", "ood_hi.png"]
    assert all(r["attrs"]["data-class"] == "Pro-B" and "review" in r["attrs"]["data-flag"].split() for r in shown)
    shown = dump("#class=Early%20Pre-B")  # URL-encoded class name with a space; all flags
    assert {path_of(r) for r in shown} == {"low_2.png", "z_ok_1.png", "z_ok_5.png"}
    shown = dump("#flag=errors")  # alias
    assert sorted(path_of(r) for r in shown) == ["bad_a.png", "bad_b.png"]

    png = tmp_path / "shot.png"
    res = chromium_run([f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={png}",
                        "--window-size=1280,1600", out.as_uri() + "#flag=review"])
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert png.is_file() and png.stat().st_size > 20_000, png.stat().st_size if png.exists() else "no PNG"
    shot = cv2.imread(str(png))
    assert shot.shape[:2] == (1600, 1280), shot.shape
    assert float(shot.std()) > 10, "the screenshot is (nearly) uniform: the page did not render"
    assert time.perf_counter() - t0 < 60


def test_nan_and_odd_cells_are_read_as_empty(tmp_path):
    """pandas reads empty cells as NaN: NaN is neither a flag nor a number."""
    nan = float("nan")
    row = {"path": "n.png", "label": "Pre-B", "confidence": "0.8", "needs_review": nan, "p_Benign": nan,
           "p_Early Pre-B": "x", "p_Pre-B": 0.8, "p_Pro-B": "inf", "ood_score": nan, "out_of_distribution": nan,
           "low_content": "false", "status": "ok", "error": nan}
    rep, text = parse(write_html_report(tmp_path / "r.html", [row], class_names=CLASSES))
    assert rep.rows[0]["attrs"]["data-flag"] == "none" and rep.rows[0]["attrs"]["data-class"] == "Pre-B"
    assert "0.800" in rep.rows[0]["text"] and "nan" not in rep.rows[0]["text"].lower()


def test_cadbcnn_infer_html_option_writes_the_report_of_the_run(tmp_path, onnx_model):
    from typer.testing import CliRunner

    from cadbcnn_runtime.cli import app

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        write_image(folder / f"cell-{i}.png", seed=i)
    (folder / "broken.jpg").write_bytes(b"not an image")
    out, report = tmp_path / "r.csv", tmp_path / "review.html"
    r = CliRunner().invoke(app, [str(folder), "--model", str(onnx_model), "--out", str(out), "--html", str(report),
                                 "-q", "--review-threshold", "0.99"])
    assert r.exit_code == 1 and "review report" in r.output, r.output  # one unreadable file
    parsed, text = parse(report)
    assert sorted(path_of(x) for x in parsed.rows) == ["broken.jpg"] + [f"cell-{i}.png" for i in range(4)]
    flags = [x["attrs"]["data-flag"] for x in parsed.rows]
    assert "error" in flags and all("review" in f for f in flags[:4])  # threshold 0.99: all four need review
    assert sum(bool(x["imgs"]) for x in parsed.rows) == 4  # thumbnails of the readable images
    from cadbcnn_runtime import Classifier

    if Classifier.from_file(onnx_model, device="cpu").spec.quality is not None:  # the check ran, found none
        assert "blank-field check: not in these results" not in text
    bad = CliRunner().invoke(app, [str(folder), "--model", str(onnx_model), "--out", str(tmp_path / "s.csv"),
                                   "--html", str(tmp_path / "review.txt")])
    assert bad.exit_code == 2 and ".html" in bad.output and not (tmp_path / "s.csv").exists()


def test_blank_check_that_ran_and_found_nothing_is_not_reported_missing(tmp_path):
    rows = [ok_row("a.png", pred("Benign", 0.95)), ok_row("b.png", pred("Pro-B", 0.97))]
    for r in rows:
        r["low_content"] = False  # the model has the field-content check; no field was blank
    _, text = parse(write_html_report(tmp_path / "r.html", rows, class_names=CLASSES))
    assert "blank-field check: not in these results" not in text
    _, text = parse(write_html_report(tmp_path / "s.html", [{k: v for k, v in r.items() if k != "low_content"}
                                                          for r in rows], class_names=CLASSES))
    assert "blank-field check: not in these results" in text


@pytest.mark.parametrize("via_csv", [False, True])
def test_appearance_and_review_score_reasons_are_named_not_called_low_confidence(tmp_path, via_csv):
    """A row reviewed by the appearance check or the learned review score says so; 'low confidence' is kept for a
    flagged row that no recorded flag explains (the thresholds are not in a row)."""
    def p(label, conf, *, odd=False, unsure=False):
        return Prediction(label, CLASSES.index(label), conf, {c: conf if c == label else (1 - conf) / 3
                                                                for c in CLASSES},
                          odd or unsure or conf < 0.9, ood_score=0.1, out_of_distribution=False,
                          content_score=0.5, low_content=False, appearance_score=1.84 if odd else 0.4,
                          atypical_appearance=odd, review_score=0.412 if unsure else 0.99, low_review_score=unsure)

    rows = [ok_row("odd.png", p("Pro-B", 0.998, odd=True)), ok_row("unsure.png", p("Benign", 0.997, unsure=True)),
            ok_row("both.png", p("Pre-B", 0.95, odd=True, unsure=True)), ok_row("low.png", p("Pre-B", 0.62)),
            ok_row("fine.png", p("Benign", 0.999))]
    if via_csv:  # what `cadbcnn-infer --html` re-reads: CSV text cells
        f = tmp_path / "r.csv"
        with f.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns(CLASSES, ood=True, quality=True, appearance=True,
                                                      review_score=True))
            w.writeheader()
            w.writerows({**r, "status": "ok", "error": ""} for r in rows)
        with f.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    rep, text = parse(write_html_report(tmp_path / "r.html", rows, class_names=CLASSES))
    by = {path_of(r): r for r in rep.rows}
    flag = {k: r["attrs"]["data-flag"] for k, r in by.items()}
    assert flag == {"odd.png": "review appearance", "unsure.png": "review score", "both.png": "review appearance score",
                    "low.png": "review lowconf", "fine.png": "none"}
    assert "colour and contrast unlike the training images of Pro-B (score 1.84)" in by["odd.png"]["text"]
    assert "learned review score 0.412 below the threshold of Benign" in by["unsure.png"]["text"]
    assert all("review threshold" not in by[k]["text"] for k in ("odd.png", "unsure.png", "both.png"))
    assert "confidence 0.620 below the review threshold" in by["low.png"]["text"]
    assert 'value="appearance"' in text and 'value="score"' in text
    # the summary counts each check's reviews (a row may count in both), beside the total
    assert re.search(r'<div class="n">4</div><div class="k">needs review</div>', text)
    assert re.search(r'<div class="n">2</div><div class="k">unlike training images</div>', text)
    assert re.search(r'<div class="n">2</div><div class="k">low review score</div>', text)
