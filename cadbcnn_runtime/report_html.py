"""A self-contained HTML review report of a folder run (``cadbcnn-infer FOLDER --html report.html``).

One UTF-8 file a lab technician opens offline: no network, no external URL of any kind (no CDN, fonts or
CSS files); thumbnails are inlined as ``data:image/jpeg;base64`` URIs and a Content-Security-Policy ``<meta>``
forbids every other source (the one inline script is allowed by its SHA-256 hash only, so text from a row can
never run as script even if it were not escaped — and it always is, with ``html.escape``).

Layout, top to bottom
---------------------
1. **Summary**: total rows, classified, per-class counts, needs review, out of distribution, blank fields,
   errors, the caller's ``model_info`` text and the generation time. Each count links to its filtered view.
2. **Needs review**, sorted by risk (most dangerous first). A row is flagged when ``needs_review`` is true or
   it is out of distribution or a blank field (the runtime sets ``needs_review`` for all three; the report
   does not rely on it). The risk order is:

   a. blank or near-uniform fields (``low_content``) — no cell in view, the label is meaningless;
      among them by ascending confidence;
   b. out of distribution — by descending ``ood_score`` (rows without a score after those with one), then
      ascending confidence;
   c. the rest — colour and contrast unlike the training images of the label (``atypical_appearance``), a
      learned review score below its class's threshold (``low_review_score``), low confidence — by ascending
      confidence;

   ties by path. The reason is given in words, derived from the flags since the thresholds are not in a row:
   "blank or near-uniform field", "out of distribution (score 0.970)", "colour and contrast unlike the
   training images of Pro (score 1.84)", "learned review score 0.412 below the threshold of Pro", and
   "confidence 0.712 below the review threshold" only for a flagged row that none of the other flags explains
   (a row of a model without those checks has no such columns).
3. **Errors** (``status`` other than ``ok``): path and error message, sorted by path. They get no thumbnail
   (the file could not be read when classified).
4. **Not flagged**: the rest, sorted by path.

Thumbnails are made in that display order (flagged rows first) with ``read_image`` (bounded decoding), scaled
down with ``cv2.INTER_AREA`` so the longer side is ``thumb_px`` (never scaled up) and encoded as JPEG quality
80. At most ``max_thumbnails`` are embedded; later rows are still listed with a note, and the summary says so.
A file that cannot be read gets no thumbnail and never stops the report.

Filters
-------
Two selects, by predicted class and by flag, applied by a small inline script that sets the ``hidden``
attribute on the rows that do not match. Every row is a ``<tr class="row">`` with ``id="row-N"`` (N = its index
in ``rows``), ``data-class`` (the label; empty for errors) and ``data-flag``: space-separated tokens, any of
``review ood blank appearance score lowconf`` for flagged rows, ``error`` for errors, ``none`` for the rest. Flag
filter values: ``all``, ``review``, ``ood``, ``blank``, ``appearance``, ``score``, ``lowconf``, ``error``, ``none``
(aliases ``errors``, ``unflagged``).

The filter state lives in the URL hash, e.g. ``report.html#class=Pro-B&flag=review`` (URL-encoded, so
``class=Early%20Pre-B`` works): it is applied on load and on every hash change, and changing a select updates
the hash, so a link can point at a filtered view. An unknown class or flag value falls back to ``all``.
Without JavaScript every row is shown.

Values may be native (float/bool) or strings as read back from CSV (``"True"``, ``"0.93"``, ``""``); both are
normalised. Text cells are taken as given: strip CSV's spreadsheet-safety quote (``results.unescape_cell``)
before calling when the rows come from a CSV file.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence
from urllib.parse import quote

from .atomic import write_atomic
from .decode import cv2
from .errors import ArgumentError, OutputError
from .preprocess import ImageSource, read_image
from .reasons import review_reasons

__all__ = ["write_html_report", "risk_key", "FLAG_FILTERS"]

FLAG_FILTERS: dict[str, str] = {
    "all": "all rows",
    "review": "needs review",
    "ood": "out of distribution",
    "blank": "blank field",
    "appearance": "unlike training images",
    "score": "low review score",
    "lowconf": "low confidence",
    "error": "errors",
    "none": "not flagged",
}
JPEG_QUALITY = 80
THUMB_WORKERS = 2  # like the folder run's decoders: bounded peak memory with large images
_TRUE = {"true", "1", "yes", "y", "t"}
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0, 9), *range(10, 32), 127)}


# ---------------------------------------------------------------- normalisation

def _flag(value: object) -> bool:
    """A boolean cell, native or as CSV text ("True"/"False"/"1"/""); anything unrecognised is False."""
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    if value is None:
        return False
    try:
        return bool(value) and value == value  # NaN (an empty cell read by pandas) is not a flag
    except (TypeError, ValueError):
        return False


def _present(value: object) -> bool:
    """Whether a cell holds a value at all (a check that ran), as opposed to empty / missing / NaN."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    try:
        return value == value  # NaN is an empty cell
    except (TypeError, ValueError):
        return True


def _num(value: object) -> float | None:
    """A numeric cell, native or as CSV text; empty, unparsable, NaN or infinite gives None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _text(value: object) -> str:
    """Printable text: lone surrogates (undecodable file names) and control characters as backslash escapes."""
    s = "" if value is None else str(value)
    try:
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that surrogateescape does not own (e.g. U+D800)
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s.translate(_CONTROL)


def _esc(value: object) -> str:
    return html.escape(_text(value), quote=True)


@dataclass
class Entry:
    """One result row, normalised."""

    index: int
    path: str
    ok: bool
    label: str = ""
    confidence: float | None = None
    needs_review: bool = False
    ood: bool = False
    ood_score: float | None = None
    blank: bool = False
    blank_checked: bool = False  # the row carries a field-content verdict (True or False)
    atypical: bool = False  # colour and contrast unlike the training images of the label (appearance check)
    appearance_score: float | None = None
    low_score: bool = False  # the learned review score below its class's threshold
    review_score: float | None = None
    probabilities: dict[str, float | None] = field(default_factory=dict)
    error: str = ""

    @property
    def flagged(self) -> bool:
        return self.ok and (self.needs_review or self.ood or self.blank)

    @property
    def low_confidence(self) -> bool:
        """Flagged, and no other recorded flag explains it (the row does not carry the review thresholds)."""
        return self.flagged and not (self.ood or self.blank or self.atypical or self.low_score)

    def flag_tokens(self) -> list[str]:
        if not self.ok:
            return ["error"]
        if not self.flagged:
            return ["none"]
        return ["review"] + (["ood"] if self.ood else []) + (["blank"] if self.blank else []) + \
            (["appearance"] if self.atypical else []) + (["score"] if self.low_score else []) + \
            (["lowconf"] if self.low_confidence else [])

    def reasons(self) -> list[str]:
        out = review_reasons(self.label, blank=self.blank, ood=self.ood, ood_score=self.ood_score,
                             atypical=self.atypical, appearance_score=self.appearance_score, low_score=self.low_score,
                             review_score=self.review_score)
        if self.low_confidence:
            conf = f"{self.confidence:.3f}" if self.confidence is not None else "unknown"
            out.append(f"confidence {conf} below the review threshold")
        return out


def _status_ok(row: Mapping[str, object]) -> bool:
    status = _text(row.get("status", "")).strip().lower()
    if status:
        return status == "ok"
    return not _text(row.get("error", "")).strip()


def normalise(index: int, row: Mapping[str, object], class_names: Sequence[str]) -> Entry:
    """A result row (native or CSV strings) → ``Entry``."""
    path = _text(row.get("path", ""))
    if not _status_ok(row):
        return Entry(index, path, ok=False, error=_text(row.get("error", "")) or "unknown error")
    return Entry(index, path, ok=True, label=_text(row.get("label", "")), confidence=_num(row.get("confidence")),
                 needs_review=_flag(row.get("needs_review")), ood=_flag(row.get("out_of_distribution")),
                 ood_score=_num(row.get("ood_score")), blank=_flag(row.get("low_content")),
                 blank_checked=_present(row.get("low_content")),
                 atypical=_flag(row.get("atypical_appearance")), appearance_score=_num(row.get("appearance_score")),
                 low_score=_flag(row.get("low_review_score")), review_score=_num(row.get("review_score")),
                 probabilities={_text(c): _num(row.get(f"p_{c}")) for c in class_names})


# ---------------------------------------------------------------- order

def risk_key(e: Entry) -> tuple[int, float, float, str]:
    """Sort key of flagged rows, most risky first: blank, then OOD (by score, descending), then low confidence;
    within a tier by ascending confidence, then path."""
    tier = 0 if e.blank else 1 if e.ood else 2
    ood_part = (-e.ood_score if e.ood_score is not None else math.inf) if tier == 1 else 0.0
    conf = e.confidence if e.confidence is not None else -math.inf
    return tier, ood_part, conf, e.path


@dataclass
class Sections:
    review: list[Entry]
    errors: list[Entry]
    rest: list[Entry]


def split_sections(entries: Iterable[Entry]) -> Sections:
    entries = list(entries)
    return Sections(review=sorted((e for e in entries if e.flagged), key=risk_key),
                    errors=sorted((e for e in entries if not e.ok), key=lambda e: (e.path, e.index)),
                    rest=sorted((e for e in entries if e.ok and not e.flagged), key=lambda e: (e.path, e.index)))


# ---------------------------------------------------------------- thumbnails

def thumbnail_uri(source: ImageSource, *, thumb_px: int, name: str) -> str:
    """``data:image/jpeg;base64,...`` of the image, longer side at most ``thumb_px``; raises on unreadable input."""
    rgb = read_image(source, name=name)
    h, w = rgb.shape[:2]
    scale = thumb_px / max(h, w)
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


@dataclass
class Thumb:
    uri: str | None = None
    note: str = ""
    detail: str = ""  # why, shown as a tooltip (e.g. the decoder's message)


def make_thumbnails(ordered: Sequence[Entry], source_of: Callable[[str], ImageSource | None] | None, *,
                    raw_paths: Mapping[int, str], max_thumbnails: int, thumb_px: int,
                    workers: int = THUMB_WORKERS) -> tuple[dict[int, Thumb], int]:
    """Thumbnails for ``ordered`` (display order) up to the cap → ({row index: Thumb}, number omitted by the cap).

    Decoding runs in a small thread pool (OpenCV releases the GIL); the first ``max_thumbnails`` readable
    images in display order get one, exactly as if done one by one.
    """
    thumbs: dict[int, Thumb] = {}
    if source_of is None:
        return thumbs, 0

    def one(e: Entry) -> Thumb:
        try:
            src = source_of(raw_paths[e.index])
            if src is None:
                return Thumb(note="no image source")
            return Thumb(uri=thumbnail_uri(src, thumb_px=thumb_px, name=e.path))
        except Exception as exc:  # noqa: BLE001 — an unreadable file (ImageError, OSError…) loses its thumbnail
            return Thumb(note="no thumbnail: the image cannot be read", detail=_text(exc)[:500])

    made, pos = 0, 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cadbcnn-thumb") as pool:
        while made < max_thumbnails and pos < len(ordered):
            # the next (cap - made) rows at once: even if all succeed the cap holds, so the result is the
            # same as one by one in display order
            chunk = ordered[pos:pos + max_thumbnails - made]
            pos += len(chunk)
            for e, t in zip(chunk, pool.map(one, chunk)):
                thumbs[e.index] = t
                made += t.uri is not None
    note = f"thumbnail omitted: more than {max_thumbnails:,} images; cap with max_thumbnails"
    for e in ordered[pos:]:
        thumbs[e.index] = Thumb(note=note)
    return thumbs, len(ordered) - pos


# ---------------------------------------------------------------- HTML

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;
color:#1d2430;background:#f4f6f9}
header{background:#1f3a5f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:22px;font-weight:600}
header .meta{opacity:.85;font-size:13px;margin-top:4px}
main{padding:16px 24px 48px}
[hidden]{display:none!important}
.summary{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:12px}
.card{background:#fff;border:1px solid #d8dee8;border-radius:8px;padding:8px 14px;min-width:120px}
.card .n{font-size:22px;font-weight:650}
.card .k{font-size:12px;color:#5b6677;text-transform:uppercase;letter-spacing:.03em}
.card a{color:inherit;text-decoration:none}
.card.review{border-left:5px solid #e0a100}.card.ood{border-left:5px solid #c62828}
.card.blank{border-left:5px solid #7b5ea7}.card.error{border-left:5px solid #8e1b1b}
.card.ok{border-left:5px solid #2e7d32}
.card.appearance{border-left:5px solid #2e7d74}.card.score{border-left:5px solid #5d4037}
.classes{margin:0 0 10px;font-size:13px}
.classes a{display:inline-block;margin:2px 6px 2px 0;padding:2px 8px;border-radius:10px;background:#e3e9f2;
color:#1d2430;text-decoration:none}
.info{white-space:pre-wrap;background:#fff;border:1px solid #d8dee8;border-radius:8px;padding:8px 12px;
font-size:13px;margin:0 0 10px}
.warn{background:#fff4d6;border:1px solid #e0b84c;border-radius:8px;padding:8px 12px;margin:0 0 10px}
.filters{position:sticky;top:0;z-index:2;background:#f4f6f9;padding:8px 0;border-bottom:1px solid #d8dee8;
display:flex;gap:16px;align-items:center;flex-wrap:wrap}
.filters select{font:inherit;padding:3px 6px}
section{margin-top:18px}
section h2{font-size:18px;margin:0 0 6px}
section h2 .count{font-weight:400;color:#5b6677;font-size:14px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d8dee8}
th,td{padding:6px 8px;border-bottom:1px solid #e6eaf0;text-align:left;vertical-align:top}
th{background:#eef2f7;font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:#4a5568}
td.thumb{width:__BOX__px}
td.thumb img{display:block;width:__BOX__px;height:__BOX__px;object-fit:contain;background:#dfe4ea;border-radius:4px}
.nothumb{display:block;width:__BOX__px;font-size:11px;color:#6b7585}
td.path{word-break:break-all;max-width:360px;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
tr.flag-lowconf td:first-child{box-shadow:inset 5px 0 #e0a100}
tr.flag-appearance td:first-child,tr.flag-score td:first-child{box-shadow:inset 5px 0 #2e7d74}
tr.flag-ood td:first-child{box-shadow:inset 5px 0 #c62828}
tr.flag-blank td:first-child{box-shadow:inset 5px 0 #7b5ea7}
tr.flag-error td:first-child{box-shadow:inset 5px 0 #8e1b1b}
.badge{display:inline-block;margin:0 4px 3px 0;padding:1px 7px;border-radius:9px;font-size:12px;color:#fff}
.badge.blank{background:#7b5ea7}.badge.ood{background:#c62828}.badge.lowconf{background:#b07d00}
.badge.appearance{background:#2e7d74}.badge.score{background:#5d4037}
.reason{font-size:13px}
.err{white-space:pre-wrap;color:#8e1b1b;font-size:13px}
.probs{margin:0;padding:0;list-style:none;font-size:12px;min-width:200px;font-variant-numeric:tabular-nums}
.probs li{display:flex;justify-content:space-between;white-space:nowrap;--bar:#7d95b5;
background:linear-gradient(var(--bar),var(--bar)) no-repeat 96px 50%/calc((100% - 146px) * var(--p)) 8px,
linear-gradient(#e6eaf0,#e6eaf0) no-repeat 96px 50%/calc(100% - 146px) 8px}
.probs li span{width:90px;overflow:hidden;text-overflow:ellipsis}
.probs li.top{--bar:#1f3a5f;font-weight:650}
.empty{color:#6b7585;font-style:italic;padding:6px 0}
main .meta{color:#5b6677;font-size:13px;margin:0 0 6px}
"""

_SCRIPT = """
(function () {
  var ALIASES = {errors: "error", unflagged: "none", "not-flagged": "none", ok: "none", blank_field: "blank"};
  var cls = document.getElementById("f-class"), flag = document.getElementById("f-flag");
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.row"));
  var sections = Array.prototype.slice.call(document.querySelectorAll("section[data-section]"));
  var shownAll = document.getElementById("shown-all");
  function hasOption(sel, v) {
    for (var i = 0; i < sel.options.length; i++) { if (sel.options[i].value === v) { return true; } }
    return false;
  }
  function readHash() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    var c = p.get("class") || "all", f = (p.get("flag") || "all").toLowerCase();
    f = ALIASES[f] || f;
    cls.value = hasOption(cls, c) ? c : "all";
    flag.value = hasOption(flag, f) ? f : "all";
  }
  function writeHash() {
    var p = new URLSearchParams();
    if (cls.value !== "all") { p.set("class", cls.value); }
    if (flag.value !== "all") { p.set("flag", flag.value); }
    var h = p.toString();
    try { history.replaceState(null, "", h ? "#" + h : location.pathname + location.search); }
    catch (e) { location.hash = h; }
  }
  function apply() {
    var c = cls.value, f = flag.value, total = 0;
    rows.forEach(function (r) {
      var show = (c === "all" || r.getAttribute("data-class") === c) &&
                 (f === "all" || r.getAttribute("data-flag").split(" ").indexOf(f) >= 0);
      if (show) { r.removeAttribute("hidden"); total++; } else { r.setAttribute("hidden", ""); }
    });
    sections.forEach(function (s) {
      var rs = s.querySelectorAll("tr.row"), n = 0;
      for (var i = 0; i < rs.length; i++) { if (!rs[i].hasAttribute("hidden")) { n++; } }
      s.querySelector(".shown").textContent = String(n);
      var empty = s.querySelector(".empty"), table = s.querySelector("table");
      if (empty) { if (n === 0) { empty.removeAttribute("hidden"); } else { empty.setAttribute("hidden", ""); } }
      if (table) { if (n === 0) { table.setAttribute("hidden", ""); } else { table.removeAttribute("hidden"); } }
    });
    shownAll.textContent = String(total);
  }
  function onChange() { writeHash(); apply(); }
  cls.addEventListener("change", onChange);
  flag.addEventListener("change", onChange);
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  readHash();
  apply();
})();
"""


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _hash_link(**params: str) -> str:
    return "#" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def _probs_html(e: Entry, class_names: Sequence[str]) -> str:
    """One ``<li>`` per class (name, value; the bar is a CSS background): few DOM nodes for large folders."""
    items = []
    for c in class_names:
        p = e.probabilities.get(c)
        frac = 0.0 if p is None else max(0.0, min(1.0, p))
        top = ' class="top"' if c == e.label else ""
        items.append(f'<li{top} style="--p:{frac:.3f}"><span title="{_esc(c)}">{_esc(c)}</span>{_fmt(p)}</li>')
    return f'<ul class="probs">{"".join(items)}</ul>'


def _thumb_html(thumb: Thumb | None) -> str:
    if thumb is None:
        return '<span class="nothumb">—</span>'
    if thumb.uri is not None:
        return f'<img src="{thumb.uri}" alt="thumbnail" decoding="async">'
    tip = f' title="{_esc(thumb.detail)}"' if thumb.detail else ""
    return f'<span class="nothumb"{tip}>{_esc(thumb.note)}</span>'


def _row_attrs(e: Entry) -> str:
    tokens = e.flag_tokens()
    css = " ".join(["row", *(f"flag-{t}" for t in tokens)])
    return (f'class="{css}" id="row-{e.index}" data-class="{_esc(e.label)}" '
            f'data-flag="{" ".join(tokens)}"')


def _result_row(e: Entry, class_names: Sequence[str], thumbs: Mapping[int, Thumb], show_thumbs: bool,
                show_ood: bool) -> str:
    badges = "".join(f'<span class="badge {t}">{FLAG_FILTERS[t]}</span>' for t in e.flag_tokens()
                     if t in ("blank", "ood", "appearance", "score", "lowconf"))
    reasons = "; ".join(e.reasons()) or "—"
    cells = [f'<td class="thumb">{_thumb_html(thumbs.get(e.index))}</td>' if show_thumbs else "",
             f'<td class="path">{_esc(e.path)}</td>',
             f"<td>{_esc(e.label)}</td>",
             f'<td class="num">{_fmt(e.confidence)}</td>',
             f"<td>{_probs_html(e, class_names)}</td>",
             f'<td class="num">{_fmt(e.ood_score)}</td>' if show_ood else "",
             f'<td class="reason">{badges}{"<br>" if badges else ""}{_esc(reasons)}</td>']
    return f"<tr {_row_attrs(e)}>{''.join(cells)}</tr>"


def _results_table(entries: Sequence[Entry], class_names: Sequence[str], thumbs: Mapping[int, Thumb], *,
                   show_thumbs: bool, show_ood: bool) -> str:
    head = "".join(["<th>Image</th>" if show_thumbs else "", "<th>Path</th>", "<th>Label</th>",
                    "<th>Confidence</th>", "<th>Class probabilities</th>",
                    "<th>OOD score</th>" if show_ood else "", "<th>Reason</th>"])
    body = "\n".join(_result_row(e, class_names, thumbs, show_thumbs, show_ood) for e in entries)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _errors_table(entries: Sequence[Entry]) -> str:
    body = "\n".join(f'<tr {_row_attrs(e)}><td class="path">{_esc(e.path)}</td>'
                     f'<td class="err">{_esc(e.error)}</td></tr>' for e in entries)
    return f"<table><thead><tr><th>Path</th><th>Error</th></tr></thead><tbody>\n{body}\n</tbody></table>"


def _section(key: str, title: str, entries: Sequence[Entry], table: str, note: str) -> str:
    inner = table if entries else ""
    return (f'<section id="{key}" data-section="{key}"><h2>{html.escape(title)} '
            f'<span class="count">(<span class="shown">{len(entries)}</span> shown of {len(entries):,})</span></h2>'
            f'<p class="meta">{html.escape(note)}</p>'
            f'<div class="empty"{" hidden" if entries else ""}>No rows match.</div>{inner}</section>')


def _card(kind: str, label: str, value: str, link: str | None) -> str:
    body = f'<div class="n">{value}</div><div class="k">{html.escape(label)}</div>'
    if link:
        body = f'<a href="{html.escape(link)}">{body}</a>'
    return f'<div class="card {kind}">{body}</div>'


def _summary_html(entries: Sequence[Entry], sections: Sections, class_labels: Sequence[str], *,
                  has_ood: bool, has_blank: bool, omitted: int, max_thumbnails: int, model_info: str,
                  generated: str) -> str:
    ok = [e for e in entries if e.ok]
    counts = {c: 0 for c in class_labels}
    for e in ok:
        counts[e.label] = counts.get(e.label, 0) + 1
    n_ood = sum(e.ood for e in ok)
    n_blank = sum(e.blank for e in ok)
    # the appearance check and the learned review score have cards only where the results carry them
    looks = [_card("appearance", FLAG_FILTERS["appearance"], f"{sum(e.atypical for e in ok):,}",
                   _hash_link(flag="appearance"))] if any(e.appearance_score is not None for e in ok) else []
    score = [_card("score", FLAG_FILTERS["score"], f"{sum(e.low_score for e in ok):,}",
                   _hash_link(flag="score"))] if any(e.review_score is not None for e in ok) else []
    cards = [
        _card("", "total", f"{len(entries):,}", "#"),
        _card("ok", "classified", f"{len(ok):,}", None),
        _card("review", "needs review", f"{len(sections.review):,}", _hash_link(flag="review")),
        _card("ood", "out of distribution", f"{n_ood:,}" if has_ood else "n/a",
              _hash_link(flag="ood") if has_ood else None),
        _card("blank", "blank fields", f"{n_blank:,}" if has_blank else "n/a",
              _hash_link(flag="blank") if has_blank else None),
        *looks, *score,
        _card("error", "errors", f"{len(sections.errors):,}", _hash_link(flag="error")),
    ]
    classes = "".join(f'<a href="{html.escape(_hash_link(**{"class": c}))}">{_esc(c)}: <b>{n:,}</b></a>'
                      for c, n in counts.items())
    parts = [f'<div class="summary">{"".join(cards)}</div>',
             f'<p class="classes"><b>Per class:</b> {classes}</p>']
    notes = []
    if not has_ood:
        notes.append("out-of-distribution check: not in these results (the model has no OOD output)")
    if not has_blank:
        notes.append("blank-field check: not in these results")
    if notes:
        parts.append(f'<p class="meta">{html.escape("; ".join(notes))}.</p>')
    if omitted:
        parts.append(f'<p class="warn">Thumbnails: {omitted:,} of the rows show no thumbnail because the report '
                     f'holds at most {max_thumbnails:,} images (rows needing review got theirs first); cap with '
                     f'max_thumbnails.</p>')
    if model_info:
        parts.append(f'<p class="info"><b>Model:</b> {_esc(model_info)}</p>')
    parts.append(f'<p class="meta">Generated {html.escape(generated)}.</p>')
    return "\n".join(parts)


def _filters_html(class_labels: Sequence[str], total: int) -> str:
    class_opts = '<option value="all">all classes</option>' + "".join(
        f'<option value="{_esc(c)}">{_esc(c)}</option>' for c in class_labels)
    flag_opts = "".join(f'<option value="{k}">{html.escape(v)}</option>' for k, v in FLAG_FILTERS.items())
    return (f'<div class="filters"><label>Class <select id="f-class">{class_opts}</select></label>'
            f'<label>Flag <select id="f-flag">{flag_opts}</select></label>'
            f'<span>Showing <b id="shown-all">{total:,}</b> of {total:,} rows</span></div>')


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
            "base-uri 'none'; form-action 'none'")


def render_html(entries: Sequence[Entry], *, class_names: Sequence[str], thumbs: Mapping[int, Thumb],
                omitted: int, show_thumbs: bool, title: str, model_info: str, max_thumbnails: int,
                thumb_px: int, generated: str) -> str:
    """The whole page as one string."""
    sections = split_sections(entries)
    ok = [e for e in entries if e.ok]
    extra = sorted({e.label for e in ok} - set(class_names))
    class_labels = [*class_names, *extra]
    has_ood = any(e.ood or e.ood_score is not None for e in ok)
    has_blank = any(e.blank_checked for e in ok)
    table_opts = {"show_thumbs": show_thumbs, "show_ood": has_ood}
    summary = _summary_html(entries, sections, class_labels, has_ood=has_ood, has_blank=has_blank,
                            omitted=omitted, max_thumbnails=max_thumbnails, model_info=model_info,
                            generated=generated)
    body = [
        _section("review", "Needs review", sections.review,
                 _results_table(sections.review, class_labels, thumbs, **table_opts),
                 "Most risky first: blank fields, then out of distribution (highest score first), then low "
                 "confidence (lowest first)."),
        _section("errors", "Errors", sections.errors, _errors_table(sections.errors),
                 "Files that could not be classified, by path."),
        _section("rest", "Not flagged", sections.rest,
                 _results_table(sections.rest, class_labels, thumbs, **table_opts), "By path."),
    ]
    css = _CSS.replace("__BOX__", str(thumb_px))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_csp(_SCRIPT)}">'
            f'<meta name="referrer" content="no-referrer">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{css}</style></head>\n<body>"
            f'<header><h1>{_esc(title)}</h1><div class="meta">{len(entries):,} images · '
            f"{len(sections.review):,} need review · {len(sections.errors):,} errors</div></header>\n<main>"
            f"{summary}\n{_filters_html(class_labels, len(entries))}\n" + "\n".join(body) +
            f"</main>\n<script>{_SCRIPT}</script>\n</body></html>\n")


# ---------------------------------------------------------------- writing

def _write_atomic(out: Path, text: str) -> None:
    """``atomic.write_atomic`` with the HTML report's own errors: readers see the old file or the new one."""
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give a file name for the HTML report, e.g. {out / 'report.html'}")
    if not folder.is_dir():
        raise OutputError(f"cannot write the HTML report in {folder} (no such folder); check that the folder "
                          "exists and is writable")
    try:
        write_atomic(out, text.encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write the HTML report {out} ({exc.strerror or exc}); check free space "
                          "and permissions") from None


def write_html_report(out: Path, rows: list[dict], *, class_names: Sequence[str],
                      source_of: Callable[[str], ImageSource | None] | None = None,
                      title: str = "cadbcnn review report", model_info: str = "",
                      max_thumbnails: int = 2000, thumb_px: int = 96) -> Path:
    """Write the self-contained review report of ``rows`` (``cadbcnn-infer`` result rows) to ``out``; returns it.

    ``source_of(path)`` gives a row's image (a path, bytes or an RGB array) or None; without it there are no
    thumbnails. See the module docstring for the order of rows, the filters and the URL hash.
    """
    if isinstance(max_thumbnails, bool) or not isinstance(max_thumbnails, int) or max_thumbnails < 0:
        raise ArgumentError(f"max_thumbnails must be an integer >= 0, got {max_thumbnails!r}")
    if isinstance(thumb_px, bool) or not isinstance(thumb_px, int) or not 8 <= thumb_px <= 1024:
        raise ArgumentError(f"thumb_px must be an integer from 8 to 1024, got {thumb_px!r}")
    out = Path(out)
    entries = [normalise(i, r, class_names) for i, r in enumerate(rows)]
    class_names = [_text(c) for c in class_names]  # as displayed; entries use the same form
    raw_paths = {i: str(r.get("path", "")) for i, r in enumerate(rows)}
    sections = split_sections(entries)
    thumbs, omitted = make_thumbnails([*sections.review, *sections.rest], source_of, raw_paths=raw_paths,
                                      max_thumbnails=max_thumbnails, thumb_px=thumb_px)
    page = render_html(entries, class_names=class_names, thumbs=thumbs, omitted=omitted,
                       show_thumbs=source_of is not None, title=title, model_info=model_info,
                       max_thumbnails=max_thumbnails, thumb_px=thumb_px,
                       generated=datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"))
    _write_atomic(out, page)
    return out
