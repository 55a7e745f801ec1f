import numpy as np
import onnxruntime as ort
import pytest
import torch

from cadbcnn_runtime.errors import CadbcnnError
from cadbcnn_train.model import MODELS, CrossAttentionFusion, create_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_entry_gives_logits_and_features(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=4).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits = m(x)
        feats = m.forward_features(x)
        assert torch.equal(m.forward_head(feats), logits)
        # uint8 and float [0, 1] inputs mean the same thing: normalisation is inside
        assert torch.allclose(m(x.float() / 255.0), logits, atol=1e-5)
    assert logits.shape == (2, 4) and feats.shape == (2, m.num_features)


def test_cadbcnn_branch_maps_are_reachable():
    m = create_model("cadbcnn", num_classes=4).eval()
    with torch.no_grad():
        fa, fb = m.forward_branches(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert fa.shape == fb.shape == (1, 512, 7, 7)
    assert m.num_features == 512


def test_cross_attention_mixes_the_branches():
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(512, 512, dim=64, num_heads=4, dropout=0.0).eval()
    fa = torch.randn(2, 512, 7, 7)
    fb = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        ta, tb = fusion.tokens(fa, fb)
        ya, _ = fusion.fuse_tokens(ta, tb)
        ya2, _ = fusion.fuse_tokens(ta, tb + torch.randn_like(tb))  # change only branch-2 tokens
    assert not torch.allclose(ya, ya2, atol=1e-4), "branch-1 output must depend on branch-2 tokens"
    # and the concat baseline by construction does not mix: its branch-1 half ignores branch 2
    cat = create_model("dual_concat", num_classes=4).fusion
    assert torch.equal(cat(fa, fb)[:, :512], cat(fa, fb * 2)[:, :512])


def test_onnx_export_parity_batch_1_and_5(tmp_path):
    from cadbcnn_export.graph import torch_to_onnx

    torch.manual_seed(0)
    m = create_model("cadbcnn", num_classes=4).eval()
    proto = torch_to_onnx(m, (64, 64), 18)  # traced at batch 2
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        x = np.random.default_rng(b).integers(0, 256, (b, 3, 64, 64), dtype=np.uint8)
        with torch.no_grad():
            ref = m(torch.from_numpy(x)).numpy()
        got = sess.run(["logits"], {"image": x})[0]
        assert got.shape == (b, 4)
        assert np.abs(ref - got).max() < 1e-4


def test_pretrained_imagenet_fails_clearly_without_local_weights(tmp_path, monkeypatch):
    from cadbcnn_train.train import load_imagenet_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    m = create_model("cadbcnn", num_classes=4)
    with pytest.raises(CadbcnnError, match=r"resnet18-f37072fd\.pth.*not there"):
        load_imagenet_weights(m, "cadbcnn")


def test_pretrained_imagenet_loads_from_local_cache(tmp_path, monkeypatch):
    """With files in the cache, the trunks take their weights (files faked from torchvision models)."""
    from torchvision import models as tvm

    from cadbcnn_train.train import load_imagenet_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    refs = {}
    for arch in ("resnet18", "resnet34"):
        torch.manual_seed(1)
        net = getattr(tvm, arch)(weights=None)
        url = tvm.get_model_weights(arch).IMAGENET1K_V1.url
        torch.save(net.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
        refs[arch] = net.conv1.weight.detach().clone()
    m = create_model("cadbcnn", num_classes=4)
    load_imagenet_weights(m, "cadbcnn")
    assert torch.equal(m.branch_a[0].weight, refs["resnet18"])
    assert torch.equal(m.branch_b[0].weight, refs["resnet34"])
