"""WiSE-FT probe: interpolate a fine-tuned checkpoint's weights toward the released v0.1.0 (models/cadbcnn.onnx),
θ = (1 − α)·θ_v0.1.0 + α·θ_fine-tune, precise BN on 1,024 clean training images, then top-1 accuracy on the test split
and on the mild shifted sets (torch fp32, argmax: no calibration, no review rule). An experiment, not a release
step: a mixing weight worth keeping still goes through `release.sh post`, `gate` and `perclass`.

    python scripts/wise_probe.py runs/ftcd/release-s0/release.pt 1.0,0.7,0.5,0.3
"""
import sys, time
from pathlib import Path
import numpy as np, torch
from torch.utils.data import DataLoader
from cadbcnn_train.checkpoint import load_checkpoint
from cadbcnn_train.onnx_init import load_onnx_weights, rederive_batchnorm
from cadbcnn_train.train import recalibrate_bn
from cadbcnn_train import data as D
from cadbcnn_train.shifts import SHIFTS, shifted
from cadbcnn_runtime.preprocess import preprocess

torch.set_num_threads(2)
FT, INIT, DATA = Path(sys.argv[1]), Path("models/cadbcnn.onnx"), Path("../shared/data/all-leukemia")
alphas = [float(a) for a in sys.argv[2].split(",")]
ck = load_checkpoint(FT)
sf = FT.parent / "split.csv"
rows = D.split_rows(sf)
root = DATA
train = [root / r["path"] for r in rows if r["split"] == "train"]
test = {root / r["path"] for r in rows if r["split"] == "test"}
rng = np.random.default_rng(0)
pick = {train[i] for i in rng.choice(len(train), 1024, replace=False)}
ds_tr = D.load(root, class_folders=ck.class_folders, only=pick)
ds_te = D.load(root, class_folders=ck.class_folders, only=test)
imgs = [ds_te.images[s.path] for s in ds_te.samples]
truth = np.array([s.label for s in ds_te.samples])
tr_loader = lambda: DataLoader(D.ImageDataset(ds_tr.samples, ck.spec, images=ds_tr.images), batch_size=32,
                               shuffle=True, generator=torch.Generator().manual_seed(0))
ft = ck.build_model()
base = ck.build_model()
load_onnx_weights(base, INIT)
rederive_batchnorm(base, tr_loader(), torch.device("cpu"), 512)
names = ["zoom ×1.3", "hue +10°", "hue −10°", "gaussian blur σ=1.5", "gaussian blur σ=3", "gamma 0.7"]
sets = {"clean": imgs}
for sh in SHIFTS:
    if sh.name in names:
        sets[sh.name] = list(shifted(sh, imgs, 0))

@torch.no_grad()
def acc(model, images):
    pred = []
    for i in range(0, len(images), 32):
        x = torch.from_numpy(np.stack([preprocess(im, ck.spec) for im in images[i:i + 32]]))
        pred.append(model(x).argmax(1).numpy())
    return float((np.concatenate(pred) == truth).mean())

fsd, bsd = ft.state_dict(), base.state_dict()
print("| α (0 = v0.1.0, 1 = fine-tune) | " + " | ".join(sets) + " |", flush=True)
for a in alphas:
    t0 = time.time()
    m = ck.build_model()
    sd = {k: ((1 - a) * bsd[k] + a * fsd[k]) if fsd[k].is_floating_point() else fsd[k] for k in fsd}
    m.load_state_dict(sd)
    recalibrate_bn(m, tr_loader(), torch.device("cpu"), "fp32", 1024)
    m.eval()
    print(f"| {a} | " + " | ".join(f"{100 * acc(m, v):.1f}" for v in sets.values()) + f" | ({time.time() - t0:.0f} s)",
          flush=True)
