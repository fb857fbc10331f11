"""tools/prepare_coco.py on a synthetic COCO 2014: category ids with gaps, polygons (several parts, a degenerate
one), uncompressed-RLE crowds, a compressed RLE, overlaps, an image without annotations. The masks are checked
against regions rasterised here, independently of pycocotools."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from semples import datasets
from tools import prepare_coco

# pycocotools 2.0.11's decode under numpy 2 warns of numpy's copy keyword at every call; nothing of ours.
pytestmark = [pytest.mark.smoke, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# Category ids with gaps, listed out of order: ascending ids 1, 3, 18, 44, 90 take values 1..5.
CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 44, "name": "bottle"},
        {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
VALUE = {1: 1, 3: 2, 18: 3, 44: 4, 90: 5}
# The 80 category ids of the real files (1..90, ten unused).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]

# Polygons (x, y pairs, one decimal, no vertex on a pixel centre where rasterisers may tie).
PERSON_A = [[3.2, 2.1, 14.7, 3.3, 9.1, 15.8], [3.4, 20.2, 12.6, 21.1, 11.3, 33.7, 2.9, 31.4]]  # two parts
CAR_A = [[20.3, 4.2, 36.1, 2.8, 38.4, 14.9, 21.7, 16.3]]
BRUSH_A = [[24.2, 22.3, 40.8, 20.6, 45.1, 30.2, 33.3, 38.1, 22.6, 33.4]]
DOG_B = [[8.3, 8.4, 15.2, 7.9, 16.1, 14.6, 9.2, 15.3]]             # small, inside PERSON_B, listed first
PERSON_B = [[2.4, 2.2, 24.3, 3.1, 22.8, 25.7, 3.1, 24.4]]          # large, listed after DOG_B
PERSON_E = [[2.2, 2.4, 12.8, 2.1, 13.3, 20.6, 1.9, 18.2]]
CAR_F = [[1.2, 1.3, 18.7, 1.1, 18.6, 18.8, 1.4, 18.7]]            # large, listed before the crowd inside it


def rasterise(poly, h, w):
    """Pixels whose centre lies inside the polygon (even-odd rule): a rasteriser of its own, not pycocotools'."""
    xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
    py, px = np.mgrid[0:h, 0:w] + 0.5
    inside = np.zeros((h, w), bool)
    for k in range(len(xs)):
        x1, y1, x2, y2 = xs[k], ys[k], xs[(k + 1) % len(xs)], ys[(k + 1) % len(xs)]
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        inside ^= crosses & (px < x1 + (py - y1) * (x2 - x1) / (y2 - y1))
    return inside


def edge_distance(polys, h, w):
    """Distance of each pixel centre to the nearest polygon edge."""
    py, px = np.mgrid[0:h, 0:w] + 0.5
    best = np.full((h, w), np.inf)
    for poly in polys:
        pts = np.asarray(poly, float).reshape(-1, 2)
        for a, b in zip(pts, np.roll(pts, -1, axis=0)):
            t = np.clip(((px - a[0]) * (b[0] - a[0]) + (py - a[1]) * (b[1] - a[1])) / ((b - a) @ (b - a)), 0, 1)
            best = np.minimum(best, np.hypot(px - a[0] - t * (b[0] - a[0]), py - a[1] - t * (b[1] - a[1])))
    return best


def uncompressed_rle(region):
    """COCO's uncompressed RLE written out here: column-major run lengths, starting with a run of 0s."""
    flat = region.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return {"size": list(region.shape), "counts": ([0] + runs) if flat[0] else runs}


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# Regions given as masks (RLE annotations): exact expectations.
CROWD_B = box(36, 40, 28, 35, 27, 39)                                     # car crowd, apart from the rest
BOTTLE_E = box(28, 32, 15, 26, 18, 29) & ~box(28, 32, 18, 21, 22, 25)     # compressed RLE, with a hole
CROWD_F = box(20, 20, 6, 12, 5, 13)                                       # person crowd inside CAR_F


def build_coco(root):
    """A COCO 2014 folder: train A (three classes, apart), B (overlap, crowd), C (no annotation); val E, F."""
    images = {"train": [("COCO_train2014_000000000009.jpg", 40, 48), ("COCO_train2014_000000000025.jpg", 36, 40),
                        ("COCO_train2014_000000000030.jpg", 20, 24)],
              "val": [("COCO_val2014_000000000042.jpg", 28, 32), ("COCO_val2014_000000000073.jpg", 20, 20)]}
    compressed = mask_utils.encode(np.asfortranarray(BOTTLE_E.astype(np.uint8)))
    anns = {"train": [(1, 1, PERSON_A, 0), (1, 3, CAR_A, 0), (1, 90, BRUSH_A + [[2.0, 2.0, 6.0, 6.0]], 0),
                      (2, 18, DOG_B, 0), (2, 1, PERSON_B, 0), (2, 3, uncompressed_rle(CROWD_B), 1)],
            "val": [(1, 1, PERSON_E, 0), (1, 44, {"size": [28, 32], "counts": compressed["counts"].decode()}, 0),
                    (2, 3, CAR_F, 0), (2, 1, uncompressed_rle(CROWD_F), 1)]}
    os.makedirs(os.path.join(root, "annotations"))
    for split in ("train", "val"):
        folder = os.path.join(root, f"{split}2014")
        os.makedirs(folder)
        entries = []
        for n, (name, h, w) in enumerate(images[split], 1):
            Image.new("RGB", (w, h), (30 * n, 90, 150)).save(os.path.join(folder, name), quality=90)
            entries.append({"id": n, "file_name": name, "height": h, "width": w})
        annotations = [{"id": 100 * (split == "val") + k, "image_id": i, "category_id": c, "segmentation": s,
                        "iscrowd": crowd, "area": 0.0, "bbox": [0, 0, 1, 1]}
                       for k, (i, c, s, crowd) in enumerate(anns[split], 1)]
        with open(os.path.join(root, "annotations", f"instances_{split}2014.json"), "w") as f:
            json.dump({"images": entries, "annotations": annotations, "categories": CATS}, f)
    return root


def run(coco, out, *flags):
    return prepare_coco.main(prepare_coco.build_parser().parse_args(["--coco_root", coco, "--out", out, *flags]))


@pytest.fixture
def coco(tmp_path):
    return build_coco(str(tmp_path / "data" / "coco2014"))


def mask(out, image_id):
    return datasets.read_mask(os.path.join(out, "SegmentationClass", f"{image_id}.png"))


def expected(h, w, layers):
    """The class-index map of (region, value) layers drawn in order, each over the earlier ones."""
    exp = np.zeros((h, w), np.uint8)
    for region, value in layers:
        exp[region] = value
    return exp


def assert_close(got, exp, polys, bound):
    """Equal but for pixels whose centre lies within 0.25 px of a polygon edge, at most `bound` of them (the bounds
    are the counts measured with pycocotools 2.0.11). pycocotools rasterises a polygon on a 5x finer grid: on 200
    random polygons its pixels differed from the pixel-centre rule only where the centre lay within 0.14 px of an
    edge. PIL's ImageDraw.polygon, by contrast, fills both end rows and columns (a 20x15 box: 336 pixels, not
    300), too coarse a reference."""
    diff = got != exp
    if diff.any():
        assert polys, "RLE regions must match exactly"
        near = edge_distance(polys, *got.shape)
        assert (near[diff] < 0.25).all(), f"pixels off the boundary differ: {np.argwhere(diff & (near >= 0.25))}"
    assert diff.sum() <= bound, diff.sum()


def test_masks_classes_overlaps_crowds_lists_links(coco, tmp_path):
    out = str(tmp_path / "data" / "coco")
    res = run(coco, out)

    # Lists: every train2014 id (the unannotated one too) in train_aug and train, every val2014 id in val.
    seg = os.path.join(out, "ImageSets", "Segmentation")
    train = ["COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_train2014_000000000030"]
    val = ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    for name, ids in (("train_aug", train), ("train", train), ("val", val)):
        assert open(os.path.join(seg, f"{name}.txt")).read() == "".join(f"{i}\n" for i in ids)
    assert datasets.read_ids(out, "train_aug") == train
    assert res["train"]["images"] == 3 and res["train"]["annotated"] == 2 and res["train"]["masks_written"] == 3
    assert res["train"]["polygons_dropped"] == 1 and res["val"]["masks_written"] == 2

    # A: three categories apart, ids 1, 3, 90 -> 1, 2, 5; the 2-point polygon of the toothbrush covers nothing.
    a = mask(out, train[0])
    exp = expected(40, 48, [(rasterise(p, 40, 48), VALUE[1]) for p in PERSON_A]
                   + [(rasterise(CAR_A[0], 40, 48), VALUE[3]), (rasterise(BRUSH_A[0], 40, 48), VALUE[90])])
    assert set(np.unique(a)) == {0, 1, 2, 5}
    assert_close(a, exp, PERSON_A + CAR_A + BRUSH_A, bound=9)  # measured: 9 of 1920
    assert (a[:8, :8] != 5).all()  # the dropped polygon [2, 2, 6, 6] was not read as a box

    # B: the small dog, listed before the large person lying under it, stays on top; the crowd (uncompressed
    # RLE) carries its class, exactly.
    b = mask(out, train[1])
    exp = expected(36, 40, [(rasterise(PERSON_B[0], 36, 40), VALUE[1]), (rasterise(DOG_B[0], 36, 40), VALUE[18]),
                            (CROWD_B, VALUE[3])])
    assert_close(b, exp, PERSON_B + DOG_B, bound=4)  # measured: 4
    assert (b[CROWD_B] == VALUE[3]).all() and (b[~CROWD_B] != VALUE[3]).all()
    dog_area = int(mask_utils.area(mask_utils.frPyObjects(DOG_B, 36, 40))[0])
    assert (b == VALUE[18]).sum() == dog_area  # not a pixel of the dog painted over

    # C: no annotation -> all background, still listed.
    c = mask(out, train[2])
    assert c.shape == (20, 24) and not c.any()

    # E: a polygon and a compressed RLE (exact, hole included).
    e = mask(out, val[0])
    exp = expected(28, 32, [(rasterise(PERSON_E[0], 28, 32), VALUE[1]), (BOTTLE_E, VALUE[44])])
    assert_close(e, exp, PERSON_E, bound=1)  # measured: 1
    assert (e[BOTTLE_E] == VALUE[44]).all() and (e[~BOTTLE_E] != VALUE[44]).all()

    # F: a crowd listed after the large car it lies on is drawn over it (smaller on top, whatever the file order).
    f = mask(out, val[1])
    exp = expected(20, 20, [(rasterise(CAR_F[0], 20, 20), VALUE[3]), (CROWD_F, VALUE[1])])
    assert_close(f, exp, CAR_F, bound=0)  # measured: 0
    assert (f[CROWD_F] == VALUE[1]).all()

    # Links: relative, to the COCO file; moving data/ as a whole keeps them valid.
    for i, folder in [(i, "train2014") for i in train] + [(i, "val2014") for i in val]:
        link = os.path.join(out, "JPEGImages", f"{i}.jpg")
        assert os.path.islink(link) and not os.path.isabs(os.readlink(link))
        assert os.path.samefile(link, os.path.join(coco, folder, f"{i}.jpg"))
    assert datasets.read_image(datasets.image_path(out, val[1])).shape == (20, 20, 3)
    shutil.move(str(tmp_path / "data"), str(tmp_path / "moved"))
    moved = str(tmp_path / "moved" / "coco")
    assert all(os.path.exists(os.path.join(moved, "JPEGImages", f"{i}.jpg")) for i in train + val)

    record = json.load(open(os.path.join(moved, "prepare_coco.json")))
    assert record["crowd"] == "class" and record["categories"] == [[1, "person"], [3, "car"], [18, "dog"],
                                                                   [44, "bottle"], [90, "toothbrush"]]


def tree_state(out):
    """{path: (lstat mtime_ns, size)} of everything under out."""
    state = {}
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            state[os.path.join(root, name)] = (st.st_mtime_ns, st.st_size)
    return state


def test_second_run_writes_nothing_and_a_killed_run_resumes(coco, tmp_path):
    out = str(tmp_path / "out")
    run(coco, out)
    before = tree_state(out)
    res = run(coco, out)
    assert tree_state(out) == before  # no file written, replaced or added (nor a lock or temp file left)
    for split, n in (("train", 3), ("val", 2)):
        assert (res[split]["masks_written"], res[split]["masks_kept"]) == (0, n)
        assert (res[split]["links_made"], res[split]["links_kept"]) == (0, n)
        assert set(res[split]["lists"].values()) == {"kept"}

    # A killed run: one mask never renamed into place, its temporary file left behind.
    victim = os.path.join(out, "SegmentationClass", "COCO_val2014_000000000073.png")
    good = datasets.read_mask(victim)
    os.remove(victim)
    stray = os.path.join(out, "SegmentationClass", ".COCO_val2014_000000000073.png.x1y2.tmp")
    open(stray, "wb").write(b"half a PNG")
    res = run(coco, out)
    assert (res["val"]["masks_written"], res["val"]["masks_kept"], res["train"]["masks_written"]) == (1, 1, 0)
    assert not os.path.exists(stray) and np.array_equal(datasets.read_mask(victim), good)


def test_crowd_ignore_and_skip_unannotated(coco, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "ignore")
    run(coco, ref)
    res = run(coco, out, "--crowd", "ignore", "--skip_unannotated")
    b, b_ref = mask(out, "COCO_train2014_000000000025"), mask(ref, "COCO_train2014_000000000025")
    assert (b[CROWD_B] == 255).all() and np.array_equal(b[~CROWD_B], b_ref[~CROWD_B])
    f, f_ref = mask(out, "COCO_val2014_000000000073"), mask(ref, "COCO_val2014_000000000073")
    assert (f[CROWD_F] == 255).all() and np.array_equal(f[~CROWD_F], f_ref[~CROWD_F])
    assert datasets.read_ids(out, "train") == ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    assert not os.path.exists(os.path.join(out, "SegmentationClass", "COCO_train2014_000000000030.png"))
    assert res["train"]["listed"] == 2 and res["train"]["images"] == 3

    # The same --out with the other crowd rule would mix two kinds of masks: refused, naming the record.
    with pytest.raises(ValueError, match=r"prepare_coco\.json.*--crowd ignore"):
        run(coco, out)


def test_all_80_categories_map_to_coco_classes(tmp_path):
    root = build_coco(str(tmp_path / "coco2014"))
    for split in ("train", "val"):
        path = os.path.join(root, "annotations", f"instances_{split}2014.json")
        data = json.load(open(path))
        data["categories"] = [{"id": i, "name": n} for i, n in reversed(list(zip(COCO_IDS, datasets.COCO_CLASSES)))]
        json.dump(data, open(path, "w"))
    out = str(tmp_path / "out")
    run(root, out)
    a = mask(out, "COCO_train2014_000000000009")
    assert {int(v) for v in np.unique(a)} == {0, 1, 3, 80}  # person 1, car (id 3) 3, toothbrush (id 90) 80
    assert (mask(out, "COCO_train2014_000000000025") == 17).any()  # dog: id 18, after the unused id 12
    assert (mask(out, "COCO_val2014_000000000042")[BOTTLE_E] == 40).all()  # bottle: id 44, 40th category
    names = json.load(open(os.path.join(out, "prepare_coco.json")))["categories"]
    assert [n for _, n in names] == datasets.COCO_CLASSES

    data["categories"][0]["name"] = "tooth brush"  # a renamed category is refused
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError, match=r"instances_val2014\.json.*COCO_CLASSES.*class 80.*tooth brush"):
        run(root, str(tmp_path / "out2"))


def edit(root, split, change):
    path = os.path.join(root, "annotations", f"instances_{split}2014.json")
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))
    return path


@pytest.mark.parametrize("case", ["no_root", "no_images", "no_annotation_file", "not_json", "no_categories",
                                  "no_annotations", "unknown_category", "missing_jpeg", "bad_rle",
                                  "val_categories_differ"])
def test_bad_input_is_refused_naming_the_file(coco, tmp_path, case):
    ann = lambda split: os.path.join(coco, "annotations", f"instances_{split}2014.json")  # noqa: E731
    root, error = coco, ValueError
    if case == "no_root":
        root, error, names = str(tmp_path / "nowhere"), FileNotFoundError, [str(tmp_path / "nowhere")]
    elif case == "no_images":
        shutil.rmtree(os.path.join(coco, "val2014"))
        error, names = FileNotFoundError, [os.path.join(coco, "val2014"), "val2014.zip"]
    elif case == "no_annotation_file":
        os.remove(ann("train"))
        error, names = FileNotFoundError, [ann("train"), "annotations_trainval2014.zip"]
    elif case == "not_json":
        open(ann("val"), "w").write('{"images": [')
        names = [ann("val"), "not valid JSON"]
    elif case == "no_categories":
        names = [edit(coco, "train", lambda d: d.pop("categories")), "'categories'"]
    elif case == "no_annotations":
        names = [edit(coco, "val", lambda d: d.pop("annotations")), "'annotations'"]
    elif case == "unknown_category":
        names = [edit(coco, "train", lambda d: d["annotations"][1].update(category_id=12)), "annotation 2",
                 "category id 12", "1, 3, 18, 44, 90"]
    elif case == "missing_jpeg":
        os.remove(os.path.join(coco, "train2014", "COCO_train2014_000000000030.jpg"))
        error, names = FileNotFoundError, [os.path.join(coco, "train2014", "COCO_train2014_000000000030.jpg")]
    elif case == "bad_rle":  # runs not summing to h * w (too many would make pycocotools write past its buffer)
        names = [edit(coco, "val", lambda d: d["annotations"][1]["segmentation"].update(
            counts=mask_utils.encode(np.zeros((28, 31), np.uint8, order="F"))["counts"].decode())),
                 "annotation 102", "compressed RLE"]
    else:
        names = [edit(coco, "val", lambda d: d["categories"].pop()), "prepare_coco.json", "categories differ"]
    out = str(tmp_path / "out")
    with pytest.raises(error) as e:
        run(root, out)
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    # Refused before the bad split draws a mask: the folders and train2014's file are checked first, val2014's
    # file is read (one annotation file in memory at a time) after train2014's masks are drawn.
    masks = os.path.join(out, "SegmentationClass")
    drawn = os.listdir(masks) if os.path.isdir(masks) else []
    if case in ("not_json", "no_annotations", "bad_rle", "val_categories_differ"):
        assert len(drawn) == 3 and not [m for m in drawn if "val2014" in m]
    else:
        assert not drawn


def test_compressed_rle_runs_match_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 50, 2)
        region = rng.random((h, w)) < rng.random()
        counts = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))["counts"].decode()
        assert prepare_coco.string_runs(counts) == uncompressed_rle(region)["counts"]
    assert prepare_coco.string_runs("0o") is None  # ends inside a number


def test_command_line_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_coco.cli(["--coco_root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: --coco_root folder " in err[0] and "nowhere not found" in err[0]
