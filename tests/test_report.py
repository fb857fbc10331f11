"""report.py on a small run of the session's toy world (every stage one or two epochs, no segmenter, as
`run.sh --no-seg` leaves it): the page and its pictures are written, are valid PNGs of the sizes their
layout gives, and what they show comes from the run (results.json, seed.json, the CAM files, prompts.pt),
checked against independent recomputations; stage (b) keeps the nearest words in prompts.pt."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from semples import datasets, runtime
from semples.cams import load_cams
import eval_miou
import make_pseudo
from tools import report
import train_cam
import train_match
import train_prompt
import train_refine


def run(module, argv):
    return module.main(runtime.parse_args(module.build_parser(), module.PRESETS, [str(a) for a in argv]))


# The smoke tier (pytest -m smoke) runs every stage but train_seg through this fixture: keep it small.
@pytest.fixture(scope="module")
def small_run(toy_world, tmp_path_factory):
    """The run folder run.sh --no-seg leaves, made in this process (subprocesses cost seconds of imports)."""
    out, data, clip = tmp_path_factory.mktemp("run"), toy_world["root"], toy_world["clip"]
    cpu = ["--dataset", "toy", "--device", "cpu", "--workers", 0, "--data", data]
    ckpt = {"cam": out / "cam" / "checkpoint.pt", "a": out / "match" / "checkpoint.pt",
            "c": out / "refine" / "checkpoint.pt"}
    run(train_cam, cpu + ["--out", out / "cam", "--epochs", 1, "--batch_size", 16, "--size", 64])
    run(train_match, cpu + ["--clip", clip, "--init", ckpt["cam"], "--out", out / "match", "--epochs", 1,
                            "--batch_size", 16])
    run(train_prompt, cpu + ["--clip", clip, "--match", ckpt["a"], "--out", out / "prompt", "--epochs", 2,
                             "--batch_size", 16, "--prompt_length", 4, "--nearest_k", 3])
    run(train_refine, cpu + ["--clip", clip, "--init", ckpt["cam"], "--prompts", out / "prompt" / "prompts.pt",
                             "--out", out / "refine", "--epochs", 1, "--batch_size", 16])
    results = {"dataset": "toy", "seed": 504, "clusters": None, "segmenter_val_miou": None}
    for key, folder in (("cam", "eval_cam"), ("a", "eval_match"), ("c", "eval_refine")):  # as run.sh's seeds()
        d = out / folder
        run(make_pseudo, cpu + ["--checkpoint", ckpt[key], "--split", "train", "--out", d])
        evaluate = ["--dataset", "toy", "--data", data, "--split", "train", "--workers", 0]
        seed = run(eval_miou, evaluate + ["--cams", d / "cams", "--json", d / "seed.json"])
        mask = run(eval_miou, evaluate + ["--pred", d / "masks", "--json", d / "mask.json"])
        results[key] = {"seed_miou": round(seed["miou"], 2), "seed_threshold": seed["best_threshold"],
                        "pseudo_miou": round(mask["miou"], 2)}
    (out / "results.json").write_text(json.dumps(results))
    rep = run(report, ["--dataset", "toy", "--data", data, "--clip", clip, "--out", out, "--device", "cpu",
                       "--n", 3, "--per_class", 1, "--tile", 64])
    return {"out": out, "rep": rep, "results": results, "html": (out / "report.html").read_text(),
            "ids": datasets.read_ids(data, "train"), "root": data}


def png(path):
    """The size of a valid PNG file."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def gt_of(root, image_id):
    return datasets.read_mask(os.path.join(root, "SegmentationClass", f"{image_id}.png"))


@pytest.mark.smoke
def test_files_are_written_as_valid_pngs_of_their_layout(small_run, toy_world):
    out, rep, tile, step = small_run["out"], small_run["rep"], 64, 64 + report.GAP
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    # grid: one row per (image, class) of the first 3 train images, six columns
    want = [(i, toy_world["class_names"][v - 1]) for i in small_run["ids"][:3]
            for v in datasets.labels_of_mask(gt_of(small_run["root"], i))]
    assert [(r["id"], r["class"]) for r in rep["grid"]["rows"]] == want
    size = (report.LABELS + 6 * step + report.GAP, report.HEADER + len(want) * step + report.GAP)
    assert png(out / "report" / "grid.png") == size
    # prompt maps: one row per class present in the train list, four columns per shown image
    present = [n for n, s in rep["prompt_maps"]["classes"].items() if s["pairs"]]
    assert png(out / "report" / "prompt_maps.png") == (report.LABELS + 4 * step + report.GAP,
                                                       report.HEADER + len(present) * step + report.GAP)
    # loss curves: the training stages of a --no-seg run, one panel per logged field but time
    assert sorted(rep["curves"]) == ["cam", "match", "prompt", "refine"]
    assert not (out / "report" / "curves_seg.png").exists()
    for stage, rel in rep["curves"].items():
        last = [line for line in (out / stage / "log.txt").read_text().splitlines() if f"[{stage}]" in line][-1]
        fields = last.split("] ", 1)[1].split()[::2]  # name value name value ...
        n = len(fields) - 1  # all but time
        assert "time" in fields and "lr" in fields and n >= 2
        assert png(out / rel) == (min(3, n) * report.PANEL[0], 20 + -(-n // 3) * report.PANEL[1]), (stage, last)
        assert f'src="{rel}"' in small_run["html"]


@pytest.mark.smoke
def test_numbers_on_the_page_come_from_the_run(small_run, toy_world):
    out, rep, page, results = small_run["out"], small_run["rep"], small_run["html"], small_run["results"]
    for key in ("cam", "a", "c"):
        for number in ("seed_miou", "pseudo_miou"):
            assert f"<td>{results[key][number]:.2f}</td>" in page
        seed = json.loads((out / report.STAGES[key][0] / "seed.json").read_text())
        for name in toy_world["class_names"]:
            if seed["iou"][name] is not None:
                assert f"<td>{seed['iou'][name]:.2f}</td>" in page
    assert "not run (--no-seg)" in page
    # the first grid row's IoUs, recomputed from the CAM files and the ground truth
    row = rep["grid"]["rows"][0]
    gt = gt_of(small_run["root"], row["id"])
    v = toy_world["class_names"].index(row["class"]) + 1
    for key, (folder, _) in report.STAGES.items():
        cams, classes = load_cams(str(out / folder / "cams" / f"{row['id']}.npz"))
        t = json.loads((out / folder / "seed.json").read_text())["best_threshold"]
        pred = (cams.max(0) > t) & (classes[cams.argmax(0)] == v)
        truth, valid = gt == v, gt != 255
        want = 100 * (pred & truth & valid).sum() / ((pred | truth) & valid).sum()
        assert row["iou"][key] == pytest.approx(want) and f"<td>{want:.2f}</td>" in page
    # the prompt-map shares: one (image, class) pair each, fractions of one map, printed as computed
    pairs = {n: 0 for n in toy_world["class_names"]}
    for i in small_run["ids"]:
        for v in datasets.labels_of_mask(gt_of(small_run["root"], i)):
            pairs[toy_world["class_names"][v - 1]] += 1
    for name, s in rep["prompt_maps"]["classes"].items():
        assert s["pairs"] == pairs[name] and s["home"] == toy_world["meta"]["home"][name]
        if s["pairs"]:
            assert 0 <= s["ub_bg"] and 0 <= s["ub_obj"] and s["ub_bg"] + s["ub_obj"] <= 1 + 1e-6
            assert f"<td>{s['ub_bg']:.3f}</td>" in page and f"<td>{s['uf_obj']:.3f}</td>" in page


@pytest.mark.smoke
def test_pseudo_mask_losses_come_from_the_masks(small_run, toy_world):
    """The listed (image, class) pairs are the ones whose wrong pixels grow most from stage (a)'s pseudo masks
    to SemPLeS's, recomputed here pixel by pixel; their IoUs are eval_miou's (mask.json); the picture has a
    row per class of each listed image."""
    out, rep, names = small_run["out"], small_run["rep"], toy_world["class_names"]
    wrong, inter, union = {}, {}, {}
    for i in small_run["ids"]:
        gt = gt_of(small_run["root"], i)
        valid = gt != 255
        for st in ("a", "c"):
            pm = datasets.read_mask(str(out / report.STAGES[st][0] / "masks" / f"{i}.png"))
            for v in range(1, len(names) + 1):
                p, t = (pm == v) & valid, (gt == v) & valid
                wrong[st, i, v] = int((p ^ t).sum())
                inter[st, i, v], union[st, i, v] = int((p & t).sum()), int((p | t).sum())
    extra = {(i, v): wrong["c", i, v] - wrong["a", i, v] for i in small_run["ids"] for v in range(1, len(names) + 1)}
    want = sorted((e for e in extra.values() if e > 0), reverse=True)[:5]
    rows = rep["losses"]["rows"]
    assert [r["extra_errors"] for r in rows] == want
    masks = {st: json.loads((out / report.STAGES[st][0] / "mask.json").read_text())["iou"] for st in ("a", "c")}
    for r in rows:
        v = names.index(r["class"]) + 1
        assert extra[r["id"], v] == r["extra_errors"]
        assert r["iou_a"] == pytest.approx(masks["a"][r["class"]])
        assert r["iou_c"] == pytest.approx(masks["c"][r["class"]])
        keep = [i for i in small_run["ids"] if i != r["id"]]
        without = 100 * sum(inter["c", i, v] for i in keep) / sum(union["c", i, v] for i in keep)
        assert r["iou_c_without"] == pytest.approx(without)
        assert f"<td>{r['id']}</td><td>{r['class']}</td><td>{r['extra_errors']}</td>" in small_run["html"]
    if rows:
        shown = list(dict.fromkeys(r["id"] for r in rows))
        n_rows = sum(len(datasets.labels_of_mask(gt_of(small_run["root"], i))) for i in shown)
        step = 64 + report.GAP
        assert png(out / "report" / "losses.png") == (report.LABELS + 6 * step + report.GAP,
                                                      report.HEADER + n_rows * step + report.GAP)


@pytest.mark.smoke
def test_error_breakdown_counts_the_pseudo_mask_pixels(small_run, toy_world):
    """Spill, other and missed per class and stage are the pixel counts of the pseudo masks against the ground
    truth (recounted here image by image, 255 ignored), over the class's ground-truth area; the page shows them."""
    out, rep, names = small_run["out"], small_run["rep"], toy_world["class_names"]
    for st in report.STAGES:
        count = np.zeros((len(names) + 1, 4), np.int64)  # class: area, spill, other, missed
        for i in small_run["ids"]:
            gt = gt_of(small_run["root"], i)
            pm = datasets.read_mask(str(out / report.STAGES[st][0] / "masks" / f"{i}.png"))
            for v in range(1, len(names) + 1):
                t, p = gt == v, (pm == v) & (gt != 255)
                count[v] += [t.sum(), (p & (gt == 0)).sum(), (p & (gt > 0) & ~t).sum(), (t & (pm != v)).sum()]
        for v, n in enumerate(names, 1):
            e = rep["errors"][n]
            assert e["area"] == count[v, 0]
            if count[v, 0] == 0:
                assert e[st] is None
                continue
            assert [e[st][k] for k in ("spill", "other", "missed")] == pytest.approx(list(count[v, 1:] / count[v, 0]))
            assert e[st]["spill_near"] + e[st]["spill_far"] == pytest.approx(e[st]["spill"])
            assert f"<td>{n}</td><td>{e['area']}</td><td>{e['cam']['spill_near']:.3f}</td>" in small_run["html"]


def test_spill_splits_at_one_cell_of_the_map(tmp_path):
    """S maps a 16-px input at stride 2, so one cell is 1/8 of the side: 2 px of a 16 x 16 image. Class 1's
    mask spills a 1-px ring around its object (near), a column of 2 pixels 2 px from it (near: the box reaches
    2 px) and one 3 px from it (far), and a 2 x 2 block far off; a 255 pixel in the ring counts nowhere.
    Class 2, not in the image, spills 3 pixels: far, as nothing of it is near. The CAM network's mask is
    exact: nothing spills."""
    gt = np.zeros((16, 16), np.uint8)
    gt[4:8, 4:8] = 1
    gt[3, 3] = 255
    pm = gt.copy()
    pm[3:9, 3:9] = 1  # a ring of 20 pixels around the 4 x 4 object, one of them 255
    pm[5:7, 9:11] = 1  # columns 9 and 10: 2 and 3 px right of the object's last column (7)
    pm[13:15, 13:15] = 1  # far
    pm[0, 0:3] = 2
    for folder in ("SegmentationClass", "out/cam", "out/eval_cam/masks", "out/eval_match/masks", "out/eval_refine/masks"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(gt, "L").save(tmp_path / "SegmentationClass" / "a.png")
    for st, m in (("cam", np.where(gt == 255, 0, gt).astype(np.uint8)), ("a", pm), ("c", pm)):
        Image.fromarray(m, "L").save(tmp_path / "out" / report.STAGES[st][0] / "masks" / "a.png")
    (tmp_path / "out" / "cam" / "args.json").write_text(json.dumps({"size": 16, "output_stride": 2}))
    assert report.map_cell(str(tmp_path / "out")) == 1 / 8
    args = report.build_parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    counts = report.spill_near_far(args, ["a"], ["x", "y"], 1 / 8)
    assert counts["cam"].tolist() == [[0, 0, 0], [0, 0, 0]]
    for st in ("a", "c"):
        assert counts[st].tolist() == [[0, 19 + 2, 0], [0, 2 + 4, 3]], st  # [near, far] x class value


def test_pseudo_mask_losses_on_known_masks(tmp_path):
    """Three 8x8 images: SemPLeS's mask of class 1 floods image a (48 more wrong pixels), is better than
    stage (a)'s on image b (not listed), equal on image c; the IoUs follow by hand."""
    square = np.zeros((8, 8), np.uint8)
    square[2:6, 2:6] = 1
    gts = {"a": square, "b": square * 2, "c": square}
    preds = {"a": (square, np.ones((8, 8), np.uint8)), "b": (np.roll(square * 2, 1, 0), square * 2),
             "c": (square, square)}
    for folder in ("SegmentationClass", "out/eval_match/masks", "out/eval_refine/masks"):
        (tmp_path / folder).mkdir(parents=True)
    for i in gts:
        Image.fromarray(gts[i], "L").save(tmp_path / "SegmentationClass" / f"{i}.png")
        for st, m in zip(("a", "c"), preds[i]):
            Image.fromarray(m, "L").save(tmp_path / "out" / report.STAGES[st][0] / "masks" / f"{i}.png")
    args = report.build_parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    rows = report.pseudo_losses(args, ["a", "b", "c"], ["x", "y"], 5)
    assert [(r["id"], r["class"], r["extra_errors"]) for r in rows] == [("a", "x", 48)]
    r = rows[0]
    assert r["iou_a"] == pytest.approx(100.0)  # class 1: exact on a and c
    assert r["iou_c"] == pytest.approx(100 * 32 / 80) and r["iou_c_without"] == pytest.approx(100.0)


@pytest.mark.smoke
def test_stage_b_keeps_the_nearest_words(small_run, toy_world):
    out, words = small_run["out"], report.read_words(report.WORDS)
    ckpt = torch.load(out / "prompt" / "prompts.pt", weights_only=True)
    near = ckpt["nearest_words"]
    assert list(near) == toy_world["class_names"]
    log = (out / "prompt" / "log.txt").read_text()
    for name, pairs in near.items():
        assert len(pairs) == 3 and all(w in words for w, _ in pairs)
        assert [c for _, c in pairs] == sorted((c for _, c in pairs), reverse=True)
        assert f"nearest words to u^b {name}: " + ", ".join(f"{w} {c:.3f}" for w, c in pairs) in log
    assert small_run["rep"]["nearest_words"] == near  # the page shows what stage (b) kept
    for name, pairs in near.items():
        assert f"<td>{pairs[0][0]} {pairs[0][1]:.3f}</td>" in small_run["html"]


@pytest.mark.smoke
def test_stage_b_keeps_each_prompts_fit_to_its_backgrounds(small_run, toy_world):
    """prompts.pt's `fit`, recomputed from stage (b)'s own cache of background and foreground features: the
    mean cosine of u^b_k and of the class text with the v^b of class k's pairs, and L_refine's reach (the mean
    cosine of their v^f with u^b_k, the share above the clamp); also in the log and on the page."""
    out, names = small_run["out"], toy_world["class_names"]
    ckpt = torch.load(out / "prompt" / "prompts.pt", weights_only=True)
    cache = torch.load(out / "prompt" / "cache.pt", weights_only=True)
    clip_model = report.load_frozen_clip(toy_world["clip"], "cpu")
    u_f = report.class_text_features(clip_model, names)
    log = (out / "prompt" / "log.txt").read_text()
    assert list(ckpt["fit"]) == names
    for i, n in enumerate(names):
        v_b, f = cache["v_b"][cache["k"] == i], ckpt["fit"][n]
        assert f["pairs"] == len(v_b) > 0  # every class is in the toy train_aug list
        assert f["u_b"] == pytest.approx(float((v_b @ ckpt["u_b"][i]).mean()), abs=1e-5)
        assert f["u_f"] == pytest.approx(float((v_b @ u_f[i]).mean()), abs=1e-5)
        reach = cache["v_f"][cache["k"] == i] @ ckpt["u_b"][i]  # the foregrounds of stage (a)'s masks
        assert f["refine_cos"] == pytest.approx(float(reach.mean()), abs=1e-5)
        assert f["refine_live"] == pytest.approx(float((reach > 1e-4).float().mean()), abs=1e-6)
        assert f" {n} {f['u_b']:.3f} / {f['u_f']:.3f}" in log
        assert f" {n} {f['refine_cos']:.3f} ({f['refine_live']:.2f})" in log
        assert (f"<td>{n}</td><td>{f['pairs']}</td><td>{f['u_b']:.3f}</td><td>{f['u_f']:.3f}</td>"
                f"<td>{small_run['rep']['prompt_class_cosine'][n]:.3f}</td><td>{f['refine_cos']:.3f}</td>"
                f"<td>{f['refine_live']:.2f}</td>") in small_run["html"]
    assert small_run["rep"]["prompt_fit"] == ckpt["fit"]


def test_a_uniform_map_puts_the_background_area_on_the_background():
    """on_image's normalisation: a flat map over the patches gives each labelled pixel the same mass."""
    gt = np.zeros((40, 40), np.uint8)
    gt[10:20, 5:30], gt[0, :] = 3, 255
    full = report.on_image(torch.full((4, 4), 1 / 16), gt)
    assert full.sum() == pytest.approx(1) and full[gt == 255].sum() == 0
    assert full[gt == 0].sum() == pytest.approx((gt == 0).sum() / (gt != 255).sum())


def test_loss_curves_read_the_finished_run(tmp_path):
    """Per-epoch lines only (not 'resumed ... at epoch 3/6'); a resumed run's re-logged epoch and a run
    started afresh replace what came before; time is not a curve."""
    log = tmp_path / "log.txt"
    log.write_text("\n".join([
        "2026-01-01 00:00:00 epoch 1/3 [match] loss 3.0000 fg 1.0000 lr 1.00e-03 time 1.0s",
        "2026-01-01 00:00:01 epoch 2/3 [match] loss 2.0000 fg 0.9000 lr 5.00e-04 time 1.0s",
        "2026-01-01 00:00:02 resumed from x/checkpoint.pt at epoch 1/3",
        "2026-01-01 00:00:03 epoch 2/3 [match] loss 2.5000 fg 0.9500 lr 5.00e-04 time 1.0s",
        "2026-01-01 00:00:04 epoch 3/3 [match] loss 1.0000 fg 0.8000 lr 0.00e+00 time 1.0s"]) + "\n")
    unit, series = report.read_curves(str(log))
    assert unit == "epoch" and list(series) == ["loss", "fg", "lr"]
    assert series["loss"] == [(1, 3.0), (2, 2.5), (3, 1.0)] and series["fg"][1] == (2, 0.95)
    with open(log, "a") as f:  # the same folder run afresh (--no-resume) for one epoch
        f.write("2026-01-01 00:01:00 epoch 1/1 [match] loss 9.0000 fg 1.0000 lr 1.00e-03 time 1.0s\n")
    assert report.read_curves(str(log))[1]["loss"] == [(1, 9.0)]
    log.write_text("2026-01-01 00:00:05 iter 100/200 loss 0.5000 lr 1.00e-02 time 9.0s\n"
                   "2026-01-01 00:00:06 iter 200/200 loss 0.4000 lr 0.00e+00 time 18.0s\n"
                   "2026-01-01 00:00:07 mIoU: 66.23\n")
    assert report.read_curves(str(log)) == ("iter", {"loss": [(100, 0.5), (200, 0.4)], "lr": [(100, 0.01), (200, 0.0)]})
