"""Nothing a folder or a model file holds can abort, hang or fool a run (torch-free; marker `runtime`).

Every case of issue #18 is built here, in the test: crafted JPEG/TIFF/PPM/WebP files, FIFOs, symlink loops,
non-UTF-8 and formula-like names, deep trees, concurrent runs on one output, edited model specs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cadbcnn_runtime import ArgumentError, Classifier, ImageError, ModelSpec, read_image
from cadbcnn_runtime.respec import _with_metadata
from cadbcnn_runtime.cli import app
from cadbcnn_runtime.errors import ModelSpecError
from cadbcnn_runtime.results import OutputLock, escape_cell, unescape_cell
from cadbcnn_runtime.spec import METADATA_KEY

pytestmark = pytest.mark.runtime
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def png(path: Path, seed: int = 0, size: int = 40) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    return path


def rows_of(out: Path) -> list[dict]:
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.DictReader(f))


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "cadbcnn_runtime.cli", *map(str, args)], capture_output=True,
                          **kw)


# -- crafted files ---------------------------------------------------------------------------------------------
def crafted_jpeg() -> bytes:
    """A 600-byte JPEG whose naive first frame header says 8×8 while libjpeg reads a 30000×30000 frame.

    After SOI: ``FF 00 00 04`` (a stuffed byte: garbage to libjpeg, a 4-byte "segment" to a naive parser),
    then an APP1 segment that libjpeg skips but the misaligned naive parser walks into, holding a fake 8×8
    SOF0; then the real JPEG with its SOF0 patched to 30000×30000 (its scan data far too short).
    """
    real = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
    sof = real.index(b"\xff\xc0")
    real = real[:sof + 5] + struct.pack(">HH", 30000, 30000) + real[sof + 9:]
    fake_sof = b"\xff\xc0\x00\x11\x08\x00\x08\x00\x08\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    trick = b"\xff\x00\x00\x04" + b"\xff\xe1" + struct.pack(">H", 2 + len(fake_sof)) + fake_sof
    return real[:2] + trick + real[2:]


def huge_tiff(w: int = 30000, h: int = 30000) -> bytes:
    """A header-only 8-bit grey TIFF that declares W×H pixels (our header pre-check does not parse TIFF)."""
    entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
               (277, 3, 1), (278, 4, h), (279, 4, w * h)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", t, typ, 1, v) for t, typ, v in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 64


PPM_HEADER = b"P6 40000 40000 255"          # 18 bytes; OpenCV would decode it
WEBP_HEADER = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 20


def test_crafted_headers_are_refused_without_decoding():
    with pytest.raises(ImageError, match="pixel limit"):
        read_image(crafted_jpeg(), name="crafted.jpg")
    with pytest.raises(ImageError, match="pixel limit"):
        read_image(huge_tiff(), name="huge.tif")
    for data, name in ((PPM_HEADER, "p.png"), (WEBP_HEADER, "w.png")):
        with pytest.raises(ImageError, match="not JPEG, PNG, BMP or TIFF"):
            read_image(data, name=name)


def test_the_decoder_itself_enforces_the_pixel_limit(monkeypatch):
    """Without our header pre-check, OpenCV's own limit (set before its first decode) still refuses."""
    import cadbcnn_runtime.decode as decode

    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == str(decode.MAX_IMAGE_PIXELS)
    if not decode.DECODER_LIMIT_ACTIVE:
        pytest.skip("cv2 was imported before cadbcnn_runtime in this process")
    monkeypatch.setattr(decode, "header_size", lambda data: None)
    with pytest.raises(ImageError, match="decoder refused its header"):
        read_image(crafted_jpeg(), name="crafted.jpg")


def test_cv2_imported_first_still_refuses_oversized_images(tmp_path):
    (tmp_path / "huge.tif").write_bytes(huge_tiff())
    code = ("import cv2\nimport cadbcnn_runtime.decode as d\nfrom cadbcnn_runtime import read_image, ImageError\n"
            f"try:\n    read_image({str(tmp_path / 'huge.tif')!r})\nexcept ImageError as e:\n"
            "    print(d.DECODER_LIMIT_ACTIVE, 'pixel limit' in str(e))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "True"], r.stdout + r.stderr


def test_peak_memory_per_file_is_bounded_under_an_address_space_cap(tmp_path):
    """Under RLIMIT_AS = import footprint + 1 GiB, the attack files are refused (no MemoryError, no crash)
    and a legitimate 63-megapixel PNG still decodes."""
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.full((7000, 9000, 3), 180, np.uint8))
    files = {"crafted.jpg": crafted_jpeg(), "huge.tif": huge_tiff(), "ppm.png": PPM_HEADER, "webp.png": WEBP_HEADER}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from cadbcnn_runtime import ImageError, read_image
        vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
        for name in {sorted(files)!r}:
            try:
                read_image(Path({str(tmp_path)!r}) / name)
                print(name, 'DECODED')
            except ImageError:
                print(name, 'refused')
        img = read_image(Path({str(big)!r}))
        print('big', img.shape, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert all(lines[n] == "refused" for n in files), r.stdout
    assert lines["big"].startswith("(7000, 9000, 3)")


def test_bad_arrays_are_image_errors_and_batch_size_is_checked(onnx_model):
    with Classifier.from_file(onnx_model, device="cpu") as clf:
        for bad in (np.zeros((0, 0, 3), np.uint8), np.zeros((5,), np.uint8), np.zeros((4, 4, 5), np.uint8),
                    np.zeros((4, 4, 3), bool), np.zeros((4, 4, 3), complex), np.zeros((4, 4, 3), object),
                    np.zeros((1, 4, 4, 3), np.uint8), np.full((4, 4, 3), np.nan, np.float32)):
            with pytest.raises(ImageError):
                clf.predict(bad)
        assert clf.predict(np.zeros((4, 4, 3), np.uint8)[:, ::-1]).label  # strided views are fine
        for n in (0, -1, 1.5, True):
            with pytest.raises(ArgumentError):
                clf.predict_batch([np.zeros((4, 4, 3), np.uint8)], batch_size=n)


def test_threads_are_capped_to_the_cpus_the_process_may_use(onnx_model):
    code = textwrap.dedent(f"""
        import os
        os.sched_setaffinity(0, {{sorted(os.sched_getaffinity(0))[0]}})
        from cadbcnn_runtime import Classifier
        from cadbcnn_runtime.session import allowed_cpus
        c = Classifier.from_file({str(onnx_model)!r}, device='cpu', threads=8)
        print(allowed_cpus(), c.threads)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"]


# -- folders -----------------------------------------------------------------------------------------------------
def test_nothing_in_a_folder_aborts_the_run(tmp_path, onnx_model):
    d = tmp_path / "in"
    png(d / "good.png")
    (d / "ppm.png").write_bytes(PPM_HEADER)
    (d / "webp.png").write_bytes(WEBP_HEADER)
    (d / "crafted.jpg").write_bytes(crafted_jpeg())
    (d / "huge.tif").write_bytes(huge_tiff())
    os.symlink(d / "b.jpg", d / "a.jpg")
    os.symlink(d / "a.jpg", d / "b.jpg")
    os.symlink(d / "nowhere.jpg", d / "dangling.jpg")
    os.mkfifo(d / "fifo.jpg")
    (d / "folder.jpg").mkdir()
    out = tmp_path / "r.csv"
    t0 = time.time()
    r = run_cli([d, "--model", onnx_model, "--out", out, "-q"], timeout=120)
    assert r.returncode == 1, r.stderr  # finished, some files unreadable
    assert time.time() - t0 < 100  # the FIFO did not block
    rows = {row["path"]: row for row in rows_of(out)}
    expect = {"ppm.png": "not JPEG, PNG, BMP or TIFF", "webp.png": "not JPEG, PNG, BMP or TIFF",
              "crafted.jpg": "pixel limit", "huge.tif": "pixel limit", "a.jpg": "symlink loop",
              "b.jpg": "symlink loop", "dangling.jpg": "broken symlink", "fifo.jpg": "FIFO"}
    assert set(rows) == set(expect) | {"good.png"}  # the folder named folder.jpg is not a file
    assert rows["good.png"]["status"] == "ok"
    for name, reason in expect.items():
        assert rows[name]["status"] == "error" and reason in rows[name]["error"], (name, rows[name]["error"])


def test_non_utf8_names_are_written_exactly(tmp_path, onnx_model):
    d = tmp_path / "in"
    d.mkdir()
    raw = os.fsencode(d) + b"/caf\xe9-\xff.png"
    try:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        pytest.skip("this filesystem refuses non-UTF-8 file names")
    os.write(fd, cv2.imencode(".png", np.zeros((30, 30, 3), np.uint8))[1].tobytes())
    os.close(fd)
    png(d / "ok.png")
    out = tmp_path / "r.csv"
    r = run_cli([d, "--model", onnx_model, "--out", out, "-q"], timeout=120)
    assert r.returncode == 0, r.stderr
    rows = rows_of(out)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    assert sorted(os.fsencode(row["path"]) for row in rows) == [b"caf\xe9-\xff.png", b"ok.png"]
    r = run_cli([d, "--model", onnx_model, "--out", "-", "-q"], timeout=120)  # a table on a strict terminal
    assert r.returncode == 0 and b"caf\\xe9-\\xff.png" in r.stdout


def test_deep_trees_do_not_recurse(tmp_path, onnx_model):
    d = tmp_path / "deep"
    d.mkdir()
    p = d
    for _ in range(1100):  # os.makedirs / Path.mkdir(parents=True) would recurse too deeply themselves
        p = p / "d"
        p.mkdir()
    png(p / "bottom.png")
    png(d / "top.png")
    try:
        r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(tmp_path / "r.csv"), "-q", "-r"])
        assert r.exit_code == 0, r.output
        paths = [row["path"] for row in rows_of(tmp_path / "r.csv")]
        assert len(paths) == 2 and any(x.endswith("/d/bottom.png") and x.count("/") == 1100 for x in paths)
    finally:  # remove it bottom-up: pytest's own tmp clean-up (shutil.rmtree) would recurse too deeply
        (p / "bottom.png").unlink(missing_ok=True)
        while p != d:
            p.rmdir()
            p = p.parent


def test_ctrl_c_stops_a_run_promptly_and_keeps_rows(tmp_path, onnx_model):
    d = tmp_path / "many"
    for i in range(2000):  # ≈ 10 s of work, so the signal lands mid-run
        png(d / f"{i:04d}.png", seed=i, size=64)
    out = tmp_path / "r.csv"
    p = subprocess.Popen([sys.executable, "-m", "cadbcnn_runtime.cli", str(d), "--model", str(onnx_model), "--out",
                          str(out), "-q", "--batch", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         # as from an interactive shell: a suite started in the background of a script (`make test &`)
                         # runs with SIGINT ignored, which children inherit (Python then installs no
                         # KeyboardInterrupt handler and the run ignores Ctrl-C)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = Path(str(out) + ".partial")
    deadline = time.time() + 60
    while time.time() < deadline and (not partial.exists() or len(partial.read_bytes().splitlines()) < 10):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    rc = p.wait(timeout=30)
    stopped = time.time() - t0
    assert rc == 130, p.stderr.read()
    assert stopped < 5, stopped  # ≈ one batch (measured ≈ 0.2 s); generous for a loaded 2-core CI machine
    kept = rows_of(partial)
    assert 8 <= len(kept) < 2000 and len({r["path"] for r in kept}) == len(kept)


# -- output safety ------------------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_output_is_refused_at_once(tmp_path, onnx_model):
    d = tmp_path / "in"
    png(d / "a.png")
    out = tmp_path / "r.csv"
    with OutputLock(out):
        r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q"])
        assert r.exit_code == 2 and "another cadbcnn-infer run" in r.output
        assert not out.exists() and not Path(str(out) + ".partial").exists()
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q"])
    assert r.exit_code == 0 and not Path(str(out) + ".lock").exists()


def test_foreign_files_and_directories_are_refused_before_any_work(tmp_path, onnx_model):
    d = tmp_path / "in"
    png(d / "a.png")
    mine = tmp_path / "notes.csv"
    mine.write_text("my,own\nspreadsheet,data\n")
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(mine), "-q"])
    assert r.exit_code == 2 and "--force" in r.output and mine.read_text() == "my,own\nspreadsheet,data\n"
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(mine), "-q", "--force"])
    assert r.exit_code == 0 and rows_of(mine)[0]["path"] == "a.png"
    (tmp_path / "adir.csv").mkdir()
    r = runner.invoke(app, [str(d), "--model", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "adir.csv")])
    assert r.exit_code == 2 and "is a directory" in r.output  # refused before the model is even looked at
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(tmp_path / "nope" / "r.csv")])
    assert r.exit_code == 2 and "does not exist" in r.output
    # our own earlier output (CSV, JSON, JSON-lines) is replaced without --force
    for suffix in (".csv", ".json", ".jsonl"):
        out = tmp_path / f"again{suffix}"
        for _ in range(2):
            r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q"])
            assert r.exit_code == 0, (suffix, r.output)


def test_formula_names_are_escaped_in_csv_only_and_resume_reads_them_back(tmp_path, onnx_model):
    d = tmp_path / "in"
    names = ["=cmd.png", "+x.png", "-y.png", "@z.png", "'q.png", "a\rb.png", "plain.png"]
    for i, n in enumerate(names):
        png(d / n, seed=i)
    out = tmp_path / "r.csv"
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    raw = rows_of(out)
    cells = {row["path"] for row in raw}
    assert {"'=cmd.png", "'+x.png", "'-y.png", "'@z.png", "''q.png", "a\rb.png", "plain.png"} == cells
    assert {unescape_cell(c) for c in cells} == set(names)
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q", "--resume"])
    assert r.exit_code == 0 and f"{len(names)} already done" in r.output
    assert len(rows_of(out)) == len(names)  # nothing re-classified or appended twice (\r included)
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(tmp_path / "r.jsonl"), "-q"])
    paths = {json.loads(line)["path"] for line in (tmp_path / "r.jsonl").read_text().splitlines()}
    assert paths == set(names)  # JSON is never altered
    for v in names:
        assert unescape_cell(escape_cell(v)) == v


def test_resume_reads_the_newest_state_and_rewrites_the_partial_atomically(tmp_path, onnx_model, monkeypatch):
    d = tmp_path / "in"
    for i in range(6):
        png(d / f"i{i}.png", seed=i)
    out = tmp_path / "r.csv"
    assert runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q"]).exit_code == 0
    lines = out.read_text().splitlines()
    partial = Path(str(out) + ".partial")
    partial.write_text("\n".join(lines[:4]) + "\n")  # a later, interrupted run: 3 rows
    os.utime(out, ns=(time.time_ns() - 10**10,) * 2)
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "--resume", "-q"])
    assert r.exit_code == 0 and "3 already done" in r.output  # the newer partial, not the older finished file
    # a failure while the kept rows are rewritten leaves the old partial intact
    partial.write_text("\n".join(lines[:3]) + "\n")
    before = partial.read_bytes()
    import cadbcnn_runtime.results as results

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", boom)
    os.utime(out, ns=(time.time_ns() - 10**10,) * 2)
    with pytest.raises(KeyboardInterrupt):
        results.ResultsWriter(out, next(csv.reader([lines[0]])), results.read_previous(
            out, next(csv.reader([lines[0]])), ModelSpec.from_onnx(onnx_model).class_names))
    assert partial.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


# -- model files ----------------------------------------------------------------------------------------------------
def _replace_spec(data: bytes, value: bytes) -> bytes:
    """The ONNX bytes with the cadbcnn.spec metadata value replaced by VALUE as is (no re-stamping)."""
    return _with_metadata(data, value)


def test_edited_specs_and_weights_are_refused(tmp_path, onnx_model):
    data = onnx_model.read_bytes()
    spec = ModelSpec.from_onnx(onnx_model)
    swapped = spec.replace(class_names=list(reversed(spec.class_names)))
    cases = {
        "swapped.onnx": (_replace_spec(data, swapped.to_json().encode()), "integrity check failed"),
        "unstamped.onnx": (_replace_spec(data, spec.without_content_hash().to_json().encode()), "no content hash"),
        "nested.onnx": (_replace_spec(data, b"[" * 200_000 + b"]" * 200_000), "nested too deeply"),
        "latin1.onnx": (_replace_spec(data, spec.to_json().encode().replace(b'"Benign"', b'"B\xe9nign"')),
                        "not valid UTF-8"),
    }
    # the same spec moved onto other weights: flip one byte of the largest weight tensor
    other = bytearray(data)
    other[len(other) // 2] ^= 0x01
    cases["other-weights.onnx"] = (bytes(other), "integrity check failed")
    for name, (blob, reason) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ModelSpecError, match=reason):
            Classifier.from_file(tmp_path / name, device="cpu")
        r = runner.invoke(app, [str(tmp_path), "--model", str(tmp_path / name), "--out", "-"])
        assert r.exit_code == 2 and "Traceback" not in r.output, (name, r.output)
    # the untouched bytes still load: the surgery itself is faithful
    (tmp_path / "same.onnx").write_bytes(_replace_spec(data, spec.to_json().encode()))
    assert Classifier.from_file(tmp_path / "same.onnx", device="cpu").spec == spec


@pytest.mark.parametrize("field,values", [
    ("class_names", ["abcd", {"a": 1}, [1, 2], None, [["a"], ["b"]]]),
    ("image_size", ["64", [64], [64, "x"], [True, 64], {"h": 64}, [1e400, 64]]),
    ("mean", ["abc", [0.1, 0.2], [None, 1, 2], [float("nan")] * 3]),
    ("training", [[1, 2], "x", 5]),
    ("software", [[["a", "b"]], {"x": 1}, "s"]),
    ("ood", [[1], "x", {"output": 1, "threshold": "x"}]),
    ("review_threshold", ["0.5", None, [0.5], True]),
    ("variant", [["fp32"], {"fp32": 1}, 7]),
    ("content_sha256", [7, "x" * 64, ["a"]]),
])
def test_malformed_spec_json_of_any_shape_is_a_clean_refusal(field, values):
    base = ModelSpec(name="m", version="1", class_names=("a", "b")).to_dict()
    for v in values:
        text = json.dumps({**base, field: v}, allow_nan=True)
        with pytest.raises(ModelSpecError):
            ModelSpec.from_json(text, source="fuzz.onnx")


def test_an_unwritable_output_folder_is_a_clean_exit_2(tmp_path, onnx_model):
    d = tmp_path / "in"
    png(d / "a.png")
    out = Path("/proc/cadbcnn-test-results.csv")  # a folder nobody, root included, can create files in
    r = runner.invoke(app, [str(d), "--model", str(onnx_model), "--out", str(out), "-q"])
    assert r.exit_code == 2 and "lock file" in r.output and "Traceback" not in r.output, r.output


def test_write_atomic_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """The one atomic writer (models, specs, HTML reports): new content in full, the umask's permissions, and on a
    failed write the old file intact with no temporary file left."""
    from cadbcnn_runtime import atomic

    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    old_umask = os.umask(0o027)
    try:
        atomic.write_atomic(dest, b"new" * 1000)
    finally:
        os.umask(old_umask)
    assert dest.read_bytes() == b"new" * 1000 and (dest.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        atomic.write_atomic(dest, b"partial")
    assert dest.read_bytes() == b"new" * 1000 and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
