#!/usr/bin/env bash
# Release candidates trained on the lent GPU machine in ONE device call (docs/STATUS.md, "GPU sessions"):
# SEEDS trained side by side on the one GPU, then each seed's release steps and OOD release gate
# (`scripts/release.sh post` and `gate`, unchanged), then the chosen seed's weights (fp16 parts) and every seed's
# reports are written to $OUT, which is what comes back (at most 8 files, 64 MiB).
#
#   here    .venv/bin/python scripts/release_split.py models/cadbcnn.onnx build/release-split.csv
#           .venv/bin/python scripts/device_data.py build/release-split.csv ../shared/data/all-leukemia build/device-data
#           mkdir -p build/aside && mv models/cadbcnn.onnx models/cadbcnn.int8.onnx build/aside/
#   device  run(command="scripts/device_release.sh train build/device-data/all-leukemia", carry=["build/device-data"],
#               timeout_s=600)            # BENCH=1 first runs `make test-gpu bench-gpu` inside the same budget
#   here    git checkout -- models/
#           scripts/device_release.sh unpack FILES_AT runs/device    # the reports, and RUN/release.pt of the pick
#
# Knobs (environment): SEEDS ("0 1 2"), EPOCHS (40), BUDGET (540 s from the start to the end of packing),
# POST_S (240 s kept for the release steps and gates, which also run side by side), RECIPE (the v0.2.0 candidate
# recipe from scratch, below), TEACHER (a teacher table: distil the released model; CONSISTENCY, 1.0, its weight),
# FIT_EXTRA (more `fit` options), RUNS (runs/device), PY (python3), BENCH (0),
# ALLOW_CPU (0: refuse to train without CUDA; 1 for a smoke run here). A fit still running when its share of the
# budget ends is stopped (SIGINT) and marked TRUNCATED in the summary: its cosine schedule did not finish, so it is
# no candidate at the full protocol — lower EPOCHS, not a silent change of the schedule.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY_HERE=${PY:-$ROOT/.venv/bin/python}   # unpack runs here, in the project venv
PY=${PY:-python3}
RUNS=${RUNS:-runs/device}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-40}
BUDGET=${BUDGET:-540}
POST_S=${POST_S:-240}
RECIPE=${RECIPE-"--augment-parts scale=1,stain=1,exposure,degrade --robust-p 0.5 --select-shifted 2 --shifted-target-risk 0.02"}
FIT_EXTRA=${FIT_EXTRA-}
TEACHER=${TEACHER-}          # a teacher table (device_data.py --teacher): adds --consistency CONSISTENCY --teacher
CONSISTENCY=${CONSISTENCY:-1.0}
BENCH=${BENCH:-0}
ALLOW_CPU=${ALLOW_CPU:-0}
START=$(date +%s)

say() { echo "[device_release $(( $(date +%s) - START ))s] $*" | tee -a "$RUNS/device.log"; }

# Commands by the names release.sh calls, from this checkout, with no install (the device's python3 has torch,
# onnx, onnxruntime, OpenCV and typer; nothing can be fetched there).
shims() {
  local bin=$1
  mkdir -p "$bin/lib"
  ln -sfn "$ROOT/export" "$bin/lib/cadbcnn_export"
  ln -sfn "$ROOT/benchmarks" "$bin/lib/cadbcnn_bench"
  local pp="$ROOT:$bin/lib${PYTHONPATH:+:$PYTHONPATH}"
  for cmd in "cadbcnn-train cadbcnn_train.cli" "cadbcnn-export cadbcnn_export.cli"; do
    set -- $cmd
    printf '#!/bin/sh\nPYTHONPATH=%s exec %s -m %s "$@"\n' "$pp" "$PY" "$2" >"$bin/$1"
  done
  printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$pp" "$PY" >"$bin/python"
  chmod +x "$bin"/cadbcnn-train "$bin"/cadbcnn-export "$bin"/python
}

train() {
  local data=${1:?the data folder scripts/device_data.py wrote}
  : "${OUT:?OUT must name the folder whose files come back}"
  [[ -f "$data/split.csv" ]] || { echo "error: $data/split.csv missing; run scripts/device_data.py here first"; exit 2; }
  mkdir -p "$RUNS" "$OUT"
  local bin="$RUNS/bin"
  shims "$bin"
  if [[ "$ALLOW_CPU" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device for $PY's torch; this script trains on the lent GPU machine (ALLOW_CPU=1 for a smoke run)"
    exit 2
  fi
  say "$(nproc) cores; $("$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')")"
  if [[ "$BENCH" == 1 ]]; then
    say "GPU tests and benchmark"
    make test-gpu bench-gpu GPU_PY="$PY" GPU_OUT="$RUNS/bench" >"$RUNS/bench.log" 2>&1 || say "GPU tests/bench failed (see bench.log)"
  fi
  local n=0 cores workers
  for s in $SEEDS; do n=$((n + 1)); done
  cores=$(nproc)
  workers=$(( (cores - n) / n )); (( workers < 1 )) && workers=1
  local fit_end=$(( START + BUDGET - POST_S - 30 ))
  local teach=()
  if [[ -n "$TEACHER" ]]; then
    [[ -f "$TEACHER" ]] || { echo "error: TEACHER=$TEACHER not found; write it with scripts/device_data.py --teacher"; exit 2; }
    teach=(--consistency "$CONSISTENCY" --teacher "$TEACHER")
  fi
  say "recipe: $RECIPE ${teach[*]} $FIT_EXTRA"
  say "seeds: $SEEDS; $EPOCHS epochs; $workers loader workers each; fits stop by +$(( fit_end - START ))s"
  for s in $SEEDS; do
    (
      run="$RUNS/s$s"
      mkdir -p "$run"
      left=$(( fit_end - $(date +%s) ))
      if (( left < 60 )); then say "seed $s: no time left to train (${left}s)"; exit 0; fi
      rc=0
      timeout --signal=INT --kill-after=30 "$left" "$bin/cadbcnn-train" fit --data "$data" --split-file "$data/split.csv" \
          --out "$run" --epochs "$EPOCHS" --patience "$EPOCHS" --seed "$s" --no-ood \
          --workers "$workers" --threads 2 $RECIPE "${teach[@]}" $FIT_EXTRA >"$run/fit.log" 2>&1 || rc=$?
      echo "$rc" >"$run/fit.exit"
      if (( rc == 124 || rc == 137 )); then touch "$run/TRUNCATED"; fi
      say "seed $s: fit exit $rc"
      if [[ -f "$run/best.pt" && -f "$run/last.pt" ]]; then
        B="$bin" DATA="$data" POST_TEST=0 scripts/release.sh post "$run" >"$run/post.log" 2>&1 \
          && B="$bin" DATA="$data" scripts/release.sh gate "$run" >>"$run/post.log" 2>&1 || true
        say "seed $s: release steps and gate done ($(PYTHONPATH="$ROOT/scripts" "$PY" -c \
            "import sys; from pathlib import Path; from release_rule import ood_gate; print(ood_gate(Path(sys.argv[1])))" "$run"))"
      fi
    ) &
  done
  wait
  local pick rc=0
  pick=$("$PY" scripts/release_rule.py pick --best-if-none "$RUNS"/s* 2>>"$RUNS/device.log") || rc=$?
  if (( rc == 3 )); then
    say "no seed passed the OOD gate; packing the best on validation: $pick"
  elif (( rc != 0 )); then
    say "no seed reached the release steps"; pick=""
  else
    say "the release rule picks $pick"
  fi
  summary > "$RUNS/summary.md"
  cat "$RUNS/summary.md"
  if [[ -n "$pick" ]]; then
    "$bin/python" scripts/checkpoint_parts.py pack "$pick/release.pt" "$OUT/parts" | tee -a "$RUNS/device.log"
    echo "$pick" > "$RUNS/picked"
  fi
  pack_reports
  say "done"
}

summary() {
  "$PY" - "$RUNS" "$EPOCHS" <<'EOF'
import csv, json, sys
from pathlib import Path
sys.path.insert(0, "scripts")
from release_rule import chosen_checkpoint, ood_gate
runs, epochs = Path(sys.argv[1]), int(sys.argv[2])
print("| seed | epochs done | s / epoch (median) | state | kept | val acc % | val F1 macro | OOD gate (val) |")
print("|---:|---:|---:|---|---|---:|---:|---|")
for run in sorted(runs.glob("s*")):
    if not run.is_dir():
        continue
    rows = list(csv.DictReader(open(run / "history.csv"))) if (run / "history.csv").is_file() else []
    secs = sorted(float(r["seconds"]) for r in rows)
    med = f"{secs[len(secs) // 2]:.1f}" if secs else "—"
    rc = (run / "fit.exit").read_text().strip() if (run / "fit.exit").is_file() else "?"
    state = ("TRUNCATED" if (run / "TRUNCATED").exists() else f"failed (exit {rc})" if rc != "0"
             else "finished" if len(rows) >= epochs else "stopped early")
    try:
        kept = chosen_checkpoint(run)
        m = json.loads((run / f"val-{kept}" / "metrics.json").read_text())
        val = f"{100 * m['accuracy']:.2f} | {100 * m['f1_macro']:.2f}"
    except (OSError, KeyError, ValueError):
        kept, val = "—", "— | —"
    print(f"| {run.name[1:]} | {len(rows)} / {epochs} | {med} | {state} | {kept} | {val} | {ood_gate(run)} |")
EOF
}

# Everything but weights in one archive beside the parts (8 files come back; the parts take 5 of them and
# 63.6 of the 64 MiB). The OOD reports' JSON goes only while it fits.
pack_reports() {
  local files=() f
  for f in "$RUNS"/device.log "$RUNS"/summary.md "$RUNS"/picked "$RUNS"/bench.log "$RUNS"/bench \
           "$RUNS"/s*/{config.json,history.csv,summary.json,split.csv,fit.log,fit.exit,post.log,TRUNCATED} \
           "$RUNS"/s*/val-{best,last}/metrics.json "$RUNS"/s*/ood-gate/ood_report.md "$RUNS"/s*/gate/export-report.json; do
    [[ -e "$f" ]] && files+=("${f#"$RUNS"/}")
  done
  local room=$(( 64 * 1024 * 1024 - $(du -cb "$OUT"/parts 2>/dev/null | tail -1 | cut -f1) - 4096 ))
  tar czf "$OUT/reports.tar.gz" -C "$RUNS" "${files[@]}"
  local with_json=("${files[@]}")
  for f in "$RUNS"/s*/ood-gate/ood_report.json; do [[ -e "$f" ]] && with_json+=("${f#"$RUNS"/}"); done
  tar czf "$OUT/reports-full.tar.gz" -C "$RUNS" "${with_json[@]}"
  if (( $(stat -c %s "$OUT/reports-full.tar.gz") <= room )); then
    mv "$OUT/reports-full.tar.gz" "$OUT/reports.tar.gz"
  else
    rm "$OUT/reports-full.tar.gz"
  fi
  if (( $(stat -c %s "$OUT/reports.tar.gz") > room )); then
    say "reports.tar.gz does not fit beside the parts; keeping the summary and the logs' last lines only"
    for f in "$RUNS"/s*/*.log "$RUNS"/device.log; do [[ -e "$f" ]] && tail -n 200 "$f" >"$f.tail" && mv "$f.tail" "$f"; done
    tar czf "$OUT/reports.tar.gz" -C "$RUNS" summary.md device.log
  fi
}

unpack() {
  local from=${1:?the folder where the device call files came back} runs=${2:?where to put the runs, e.g. runs/device}
  local split=${SPLIT:-build/release-split.csv}
  mkdir -p "$runs"
  tar xzf "$from/reports.tar.gz" -C "$runs"
  cat "$runs/summary.md"
  if [[ -f "$from/parts/manifest.json" ]]; then
    local run
    run="$runs/$(basename "$(cat "$runs/picked")")"
    # the device saw the training and validation images only; here the run and its spec get the whole split back
    "$PY_HERE" scripts/checkpoint_parts.py unpack "$from/parts" "$run/release.pt" --split-file "$split"
    cp "$split" "$run/split.csv"
    echo "Next (here, on the CPU): DATA=../shared/data/all-leukemia scripts/release.sh gate $run;"
    echo "  scripts/release.sh perclass $run NAME (review rule + shift report); evaluate --split test"
  fi
}

case "${1:-}" in
  train) train "${2:-}" ;;
  unpack) unpack "${2:-}" "${3:-}" ;;
  *) echo "usage: $0 train DATA_FOLDER   (on the GPU machine; OUT set)  |  $0 unpack FILES_AT RUNS   (here)"; exit 2 ;;
esac
