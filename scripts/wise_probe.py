"""WiSE-FT probe: top-1 accuracy of a fine-tune interpolated toward the released v0.1.0 at several α
(`cadbcnn-train wise-ft`, cadbcnn_train/wise.py), on one split's clean images and on the mild shifted copies that
bind the #12 targets (torch fp32, argmax: no calibration, no review rule). Choose α on the validation split
(the default); a mixing weight worth keeping then goes through `calibrate`, `release.sh gate` and `perclass`.

    python scripts/wise_probe.py runs/ftcd/release-s0/release.pt 1.0,0.7,0.5,0.3 [val|test]
"""
import sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.wise import interpolate_checkpoint
from cadbcnn_train import data as D
from cadbcnn_train.shifts import SHIFTS, shifted
from cadbcnn_runtime.preprocess import preprocess

torch.set_num_threads(2)
FT, INIT, DATA = Path(sys.argv[1]), Path("models/cadbcnn.onnx"), Path("../shared/data/all-leukemia")
alphas = [float(a) for a in sys.argv[2].split(",")]
split = sys.argv[3] if len(sys.argv) > 3 else "val"
ck = load_checkpoint(FT)
wanted = {DATA / r["path"] for r in D.split_rows(FT.parent / "split.csv") if r["split"] == split}
ds = D.load(DATA, class_folders=ck.class_folders, only=wanted)
imgs = [ds.images[s.path] for s in ds.samples]
truth = np.array([s.label for s in ds.samples])
names = ["zoom ×1.3", "hue +10°", "hue −10°", "gaussian blur σ=1.5", "gaussian blur σ=3", "gamma 0.7"]
sets = {"clean": imgs, **{sh.name: list(shifted(sh, imgs, 0)) for sh in SHIFTS if sh.name in names}}
inputs = {k: [np.stack([preprocess(im, ck.spec) for im in v[i:i + 32]]) for i in range(0, len(v), 32)]
          for k, v in sets.items()}


@torch.no_grad()
def acc(model, batches):
    pred = np.concatenate([model(torch.from_numpy(x)).argmax(1).numpy() for x in batches])
    return float((pred == truth).mean())


print(f"{split} split, {len(truth)} images")
print("| α (0 = v0.1.0, 1 = fine-tune) | " + " | ".join(sets) + " |", flush=True)
with tempfile.TemporaryDirectory() as tmp:
    for a in alphas:
        t0 = time.time()
        out = interpolate_checkpoint(FT, INIT, a, DATA, Path(tmp) / "wise.pt", log=lambda *_: None)
        m = load_checkpoint(out).build_model().eval()
        print(f"| {a} | " + " | ".join(f"{100 * acc(m, v):.1f}" for v in inputs.values())
              + f" | ({time.time() - t0:.0f} s)", flush=True)
