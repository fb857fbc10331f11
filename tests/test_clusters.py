"""Category clusters (train_cam.py --clusters): the shipped cluster files are valid, the toy world carries its
own, cluster supervision changes the gradients only when enabled, and a CAM network with clusters goes
through stage (a) and the CAMs like any other. (Bad cluster files: tests/test_bad_inputs.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from semples import datasets, network
from tools import make_toy
import train_cam

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "toy", "--device", "cpu", "--workers", "0", "--batch_size", "16", "--size", "64"]


@pytest.mark.parametrize("name,classes", [("voc", datasets.VOC_CLASSES), ("coco", datasets.COCO_CLASSES),
                                          ("toy", make_toy.NAMES)])
def test_shipped_cluster_files_hold_every_class_once(name, classes):
    clusters = datasets.read_clusters(os.path.join(REPO, "semples", "clusters", f"{name}.json"), classes)
    assert sorted(c for members in clusters.values() for c in members) == sorted(classes)
    assert any(len(members) > 1 for members in clusters.values())  # something to share


def test_toy_world_writes_its_cluster_file_once(toy_world):
    path = os.path.join(toy_world["root"], "clusters.json")
    with open(path) as f, open(os.path.join(REPO, "semples", "clusters", "toy.json")) as g:
        assert json.load(f) == json.load(g)
    before = os.stat(path).st_mtime_ns
    make_toy.write_clusters(toy_world["root"])  # unchanged: not rewritten (run.sh keys on file times)
    assert os.stat(path).st_mtime_ns == before


def _pair(K, clusters):
    """S without and with clusters, equal weights; the clusters' shared maps start at zero."""
    torch.manual_seed(0)
    plain = network.MaskGenerator("tiny", K, 8)
    torch.manual_seed(0)
    with_c = network.MaskGenerator("tiny", K, 8, clusters)
    assert with_c.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["cluster_classifier.weight"]
    return plain, with_c


def _grads(S, loss):
    S.zero_grad()
    loss.backward(retain_graph=True)
    return {n: p.grad.clone() for n, p in S.named_parameters() if p.grad is not None}


def test_cluster_supervision_changes_the_gradients_only_when_enabled():
    K, clusters = 4, [[0, 1], [2], [3]]
    plain, with_c = _pair(K, clusters)
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    # Off: the objective is the plain multi-label loss on the pooled CAMs, gradient for gradient.
    loss, terms = train_cam.objective(plain(x), y)
    assert set(terms) == {"L_cls"}
    ref = torch.nn.functional.multilabel_soft_margin_loss(plain(x).mean((2, 3)), y)
    g_off, g_ref = _grads(plain, loss), _grads(plain, ref)
    assert all(torch.equal(g_off[n], g_ref[n]) for n in g_ref)
    # On: the shared maps start at zero, so S starts as the plain CAM network (same CAMs, same L_cls, same
    # backbone gradient) and L_cluster first trains the shared maps; cluster labels are "any member present".
    cams, shared = with_c(x, cluster_maps=True)
    assert torch.allclose(cams, plain(x)) and not shared.any()
    loss_on, terms_on = train_cam.objective((cams, shared), y, clusters)
    assert torch.allclose(terms_on["L_cls"], ref) and terms_on["L_cluster"] > 0
    y_cluster = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]])
    want = torch.nn.functional.multilabel_soft_margin_loss(shared.mean((2, 3)), y_cluster)
    assert torch.allclose(terms_on["L_cluster"], want)
    g_on = _grads(with_c, loss_on)
    assert g_on["cluster_classifier.weight"].abs().sum() > 0
    assert torch.allclose(g_on["backbone.0.0.weight"], g_off["backbone.0.0.weight"])
    # Once the shared maps have moved (one SGD step), L_cluster also reaches the backbone.
    with torch.no_grad():
        with_c.cluster_classifier.weight -= g_on["cluster_classifier.weight"]
    out = with_c(x, cluster_maps=True)
    full, terms = train_cam.objective(out, y, clusters)
    g_full, g_cls = _grads(with_c, full), _grads(with_c, terms["L_cls"])
    assert not torch.allclose(g_full["backbone.0.0.weight"], g_cls["backbone.0.0.weight"])
    with pytest.raises(ValueError, match="no clusters"):
        plain(x, cluster_maps=True)


def test_cam_network_with_clusters_goes_through_stage_a(toy_world, tmp_path):
    root, out = toy_world["root"], tmp_path
    clusters = os.path.join(root, "clusters.json")

    def run(script, *args):
        p = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        return p

    run("train_cam.py", *FAST, "--data", root, "--out", str(out / "cam"), "--epochs", "1", "--clusters", clusters)
    run("train_cam.py", *FAST, "--data", root, "--out", str(out / "plain"), "--epochs", "1")
    log = (out / "cam" / "log.txt").read_text()
    assert "L_cluster" in log and "L_cluster" not in (out / "plain" / "log.txt").read_text()
    S, ckpt = network.load_mask_generator(str(out / "cam" / "checkpoint.pt"), "cpu")
    assert ckpt["clusters"] == [[0, 1, 2, 3], [4, 6, 7], [5]] and S.cluster_classifier.weight.abs().sum() > 0
    plain = torch.load(out / "plain" / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(plain["backbone.0.0.weight"], ckpt["model"]["backbone.0.0.weight"])
    run("train_match.py", "--dataset", "toy", "--device", "cpu", "--workers", "0", "--batch_size", "16",
        "--data", root, "--clip", toy_world["clip"], "--init", str(out / "cam" / "checkpoint.pt"),
        "--out", str(out / "match"), "--epochs", "1")
    S_a, ckpt_a = network.load_mask_generator(str(out / "match" / "checkpoint.pt"), "cpu")
    assert ckpt_a["clusters"] == ckpt["clusters"]  # carried on: the next stages rebuild the same S
    assert not torch.equal(S_a.cluster_classifier.weight, S.cluster_classifier.weight)  # trains with the head
    assert torch.equal(S_a.backbone[0][0].weight, S.backbone[0][0].weight)  # --train head: backbone fixed
    run("make_pseudo.py", "--dataset", "toy", "--device", "cpu", "--workers", "0", "--data", root,
        "--checkpoint", str(out / "match" / "checkpoint.pt"), "--split", "train", "--out", str(out / "p"),
        "--cams_only")
    assert len(os.listdir(out / "p" / "cams")) == len(datasets.read_ids(root, "train"))
    # The cluster file is part of the run: another grouping under the same path is not resumed from.
    (tmp_path / "other.json").write_text(json.dumps({"all": toy_world["class_names"]}))
    p = subprocess.run([sys.executable, os.path.join(REPO, "train_cam.py"), *FAST, "--data", root, "--out",
                        str(out / "cam"), "--epochs", "1", "--clusters", str(tmp_path / "other.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "other flags" in p.stderr and "cluster" in p.stderr, p.stderr
