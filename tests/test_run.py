"""run.sh end to end on a very small toy configuration: every step runs, the table is printed with
numbers, results.json holds them, the report is written last and its path printed, a second run skips the
finished steps, a changed flag redoes its step and every step after it, and so does an edited dataset file."""
import json
import os
import re
import shutil
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    "TOY_ARGS": "--n_train 48 --n_val 16 --n_train_subset 16 --size 64 --clip_steps 20 --clip_batch 32",
    "CAM_ARGS": "--epochs 1 --batch_size 16 --size 64 --workers 0",
    "MATCH_ARGS": "--epochs 1 --batch_size 16 --workers 0",
    "PROMPT_ARGS": "--epochs 2 --batch_size 16 --workers 0",
    "PSEUDO_ARGS": "--workers 0",
    "SEG_ARGS": "--iters 10 --crop 48 --batch_size 8 --workers 0",
}


def table(stdout):
    """The printed results table, from its title to the results.json line."""
    return stdout[stdout.index("\nSemPLeS on "):stdout.index("\nresults: ")]


def test_run_sh_prints_the_table(tmp_path):
    env = {**os.environ, **SMALL, "PYTHON": sys.executable}
    cmd = ["bash", os.path.join(REPO, "run.sh"), "--toy", str(tmp_path / "toy"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    number = r"\d{1,3}\.\d\d"
    for row in ("CAM network", "stage (a) only: L_match", "SemPLeS (a)+(b)+(c)"):
        assert re.search(rf"^{re.escape(row)}\s+{number} t=0\.\d+\s+{number}$", proc.stdout, re.M), proc.stdout
    # the segmenter's rows state the protocol: the toy preset's one scale with its flip, without and with the CRF
    seg_row = re.search(rf"^segmenter on pseudo masks, val \(flip\)\s+({number})$", proc.stdout, re.M)
    crf_row = re.search(rf"^segmenter on pseudo masks, val \(flip\) \+ CRF\s+({number})$", proc.stdout, re.M)
    assert seg_row and crf_row, proc.stdout
    assert len(seg_row.group(0)) == len(crf_row.group(0)) == len(re.search(r"^CAM network .*$", proc.stdout,
                                                                            re.M).group(0))  # one right edge
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("cam", "a", "c"):
        assert f"{results[key]['seed_miou']:10.2f}" in proc.stdout and 0 <= results[key]["pseudo_miou"] <= 100
    assert f"{results['segmenter_val_miou']:.2f}" == seg_row.group(1)
    assert f"{results['segmenter_val_miou_crf']:.2f}" == crf_row.group(1) and results["segmenter_test_scales"] == [1.0]
    assert f"--checkpoint {tmp_path / 'out'}/seg/checkpoint.pt --crf" in (tmp_path / "out" / ".done" / "seg_crf").read_text()
    # before the first step: the CAM files' disk (3 x 16 train + 48 train_aug toy images at 17 KB) against the free
    assert re.search(r"^== disk: the CAM files will take ~\d+ [KMG]B \(3 x 16 train \+ 48 train_aug images x ~17 KB\); "
                     r"[\d.]+ [KMG]B free on the disk of ", proc.stdout, re.M), proc.stdout
    assert proc.stdout.index("== disk:") < proc.stdout.index("== cam:")
    page = tmp_path / "out" / "report.html"  # the last step, its path the last line
    assert proc.stdout.splitlines()[-1] == f"report: {tmp_path / 'out'}/report.html" and page.exists()
    assert f"<td>{results['c']['seed_miou']:.2f}</td>" in page.read_text()
    assert (tmp_path / "out" / "report" / "curves_seg.png").exists()
    # stage (c) refines stage (a)'s S, the one its prompts were learned from (docs/method.md)
    assert f"--init {tmp_path / 'out'}/match/checkpoint.pt" in (tmp_path / "out" / ".done" / "refine").read_text()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "== match: done, skipped" in again.stdout
    assert "== report: done, skipped" in again.stdout and again.stdout.endswith(proc.stdout.splitlines()[-1] + "\n")
    assert "== seg_crf: done, skipped" in again.stdout and "== seg_crf_eval: done, skipped" in again.stdout
    assert table(again.stdout) == table(proc.stdout)
    # another pseudo-mask threshold (--dry-run: printed, nothing run): the evaluations and the steps from the pseudo
    # masks on are redone, the training steps before them are not (no evaluation is any training step's input)
    dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO, env={**env, "PSEUDO_ARGS": "--workers 0 --bg_threshold 0.5"},
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    for name in ("eval_cam", "eval_match", "eval_refine", "pseudo", "seg", "seg_eval", "seg_crf", "report"):
        assert f"== {name} (dry run, not run): " in dry.stdout, (name, dry.stdout)
    for name in ("cam", "match", "prompt", "refine"):
        assert f"== {name}: done, skipped" in dry.stdout, (name, dry.stdout)
    assert "\nSemPLeS on " not in dry.stdout
    assert "--bg_threshold 0.5" not in (tmp_path / "out" / ".done" / "pseudo").read_text()  # nothing was run
    # another prompt flag: stage (b) and everything after it are redone, the steps before it are not
    changed = subprocess.run(cmd, cwd=REPO, env={**env, "PROMPT_ARGS": SMALL["PROMPT_ARGS"] + " --lambda_T 0.05"},
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "== match: done, skipped" in changed.stdout and "== prompt: its command" in changed.stdout
    assert "== refine: its command" in changed.stdout and "== seg: its command" in changed.stdout
    # an edited mask (same command): the steps that read the dataset are redone
    mask = sorted((tmp_path / "toy" / "SegmentationClass").iterdir())[0]
    os.utime(mask, (1, 1))
    edited = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert edited.returncode == 0, edited.stdout[-3000:] + edited.stderr[-3000:]
    assert "== toy: " in edited.stdout and "== cam: its command, its inputs" in edited.stdout
    # category clusters reach the CAM step (and redo it); --no-seg stops before the segmenter
    clusters = str(tmp_path / "toy" / "clusters.json")
    cl = subprocess.run(cmd + ["--clusters", clusters, "--no-seg"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
    assert cl.returncode == 0, cl.stdout[-3000:] + cl.stderr[-3000:]
    assert "== cam: its command" in cl.stdout
    assert f"--clusters {clusters}" in (tmp_path / "out" / ".done" / "cam").read_text()
    assert "== seg" not in cl.stdout
    assert re.search(r"^segmenter on pseudo masks, val\s+not run \(--no-seg\)$", cl.stdout, re.M), cl.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["segmenter_val_miou"] is None and results["clusters"] == clusters
    assert "== report: its command" in cl.stdout  # redone after the CAM network, without the segmenter's curves
    assert "not run (--no-seg)" in (tmp_path / "out" / "report.html").read_text()
    assert not (tmp_path / "out" / "report" / "curves_seg.png").exists()
    bad = subprocess.run(cmd + ["--clusters", str(tmp_path / "none.json")], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--clusters file" in bad.stderr and "none.json" in bad.stderr


def test_run_sh_never_writes_into_a_users_dataset(tmp_path):
    """--toy DIR that is not a make_toy world and has no class_names.txt is refused, untouched."""
    user = tmp_path / "mydata"
    (user / "JPEGImages").mkdir(parents=True)

    def run_sh(*extra):
        return subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--toy", str(user), "--out", str(tmp_path / "o"),
                               *extra], env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)

    proc = run_sh()
    assert proc.returncode == 2 and "neither a make_toy world" in proc.stderr
    assert sorted(os.listdir(user)) == ["JPEGImages"]
    # a folder without the lists the run is scored on is refused before any stage runs
    (user / "class_names.txt").write_text("boat\n")
    (user / "ImageSets" / "Segmentation").mkdir(parents=True)
    (user / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    proc = run_sh("--device", "nope")
    assert proc.returncode == 2, proc.stderr
    assert "has no val.txt (the list the segmenter is scored on): add it, or pass --no-seg" in proc.stderr, proc.stderr
    proc = run_sh("--device", "nope", "--no-seg")  # past the list check: the folder has no tiny_clip.pt
    assert "has no val.txt" not in proc.stderr and proc.returncode == 2, proc.stderr
    assert f"--clip file {user}/tiny_clip.pt not found" in proc.stderr and "pass --clip FILE" in proc.stderr
    (tmp_path / "clip.pt").write_bytes(b"")
    proc = run_sh("--device", "nope", "--no-seg", "--clip", str(tmp_path / "clip.pt"))  # past the checks: the first
    assert "--device" in proc.stderr, proc.stderr  # stage's --device check stops it
    (user / "ImageSets" / "Segmentation" / "train.txt").unlink()
    proc = run_sh("--no-seg")
    assert proc.returncode == 2 and "has no train.txt (the list the seeds and pseudo masks are scored on)" in proc.stderr
    assert not (tmp_path / "o" / ".done").exists() or not os.listdir(tmp_path / "o" / ".done")


def test_run_sh_on_a_foreign_world(toy_world, tmp_path):
    """A VOC-layout folder that make_toy did not make: VOC's own lists (train and val, no train_aug), other class
    names (the list begun with the background, as labelme writes it), a few images whose masks hold no class, some
    PNG images, some of other sizes (not square), and a CLIP of other widths given as a bare OpenAI state dict.
    run.sh trains on train.txt, leaves the empty images out, writes nothing into the folder and prints the table."""
    import numpy as np
    from PIL import Image

    from clip.model import CLIP
    from semples import datasets

    world = tmp_path / "world"
    for name in ("JPEGImages", "SegmentationClass", "ImageSets"):
        shutil.copytree(os.path.join(toy_world["root"], name), world / name)
    (world / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    things = [f"thing{k}" for k in range(toy_world["num_classes"])]
    (world / "class_names.txt").write_text("".join(f"{n}\n" for n in ["_background_"] + things))  # labelme's way
    train = datasets.read_ids(str(world), "train")
    for i in train[:2]:
        h, w, _ = datasets.read_image(datasets.image_path(str(world), i)).shape
        datasets.save_mask(str(world / "SegmentationClass" / f"{i}.png"), np.zeros((h, w), np.uint8))
    for i in train[2:5]:  # some images as PNG files, as a generator may write them
        jpg = world / "JPEGImages" / f"{i}.jpg"
        Image.open(jpg).save(jpg.with_suffix(".png"))
        jpg.unlink()
    val = datasets.read_ids(str(world), "val")
    def odd_size(n):
        return (50 + 13 * n, 90 - 7 * n) if n % 2 else (96 - 9 * n, 44 + 11 * n)
    for n, i in enumerate(train[5:9] + val[:2]):  # and of other sizes, not square, as photos are
        size = odd_size(n)
        jpg = world / "JPEGImages" / f"{i}.jpg"
        Image.open(jpg).resize(size, Image.BILINEAR).save(jpg)
        mask = world / "SegmentationClass" / f"{i}.png"
        Image.open(mask).resize(size, Image.NEAREST).save(mask)
    torch.manual_seed(0)
    clip = CLIP(embed_dim=40, image_resolution=48, vision_layers=2, vision_width=48, vision_patch_size=8,
                context_length=24, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=2)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    before = sorted(str(p.relative_to(world)) for p in world.rglob("*"))
    env = {**os.environ, **SMALL, "PYTHON": sys.executable}
    cmd = ["bash", os.path.join(REPO, "run.sh"), "--toy", str(world), "--clip", str(tmp_path / "clip.pt"),
           "--out", str(tmp_path / "out"), "--no-seg"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "has no train_aug.txt: training on train.txt" in proc.stdout
    assert f"2 of {len(train)} images of 'train' hold no class in their mask and are left out" in proc.stdout
    for step in ("cam", "match", "prompt", "refine"):
        assert "--split train " in (tmp_path / "out" / ".done" / step).read_text(), step
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(0 <= results[key]["seed_miou"] <= 100 for key in ("cam", "a", "c"))
    scored = json.loads((tmp_path / "out" / "eval_refine" / "seed.json").read_text())["class_names"]
    assert scored == ["background"] + things  # the list's own background line is not a class
    assert sorted(str(p.relative_to(world)) for p in world.rglob("*")) == before
    for n, i in enumerate(train[5:9]):  # pseudo masks come at each image's own size
        assert Image.open(tmp_path / "out" / "eval_refine" / "masks" / f"{i}.png").size == odd_size(n)


def test_run_sh_checks_before_any_step(tmp_path):
    """A missing --init, --seg_init or --clip file and a dense CRF that does not import are refused in one line
    naming what is missing, before any step (not even the toy world's generation) runs."""
    def run_sh(*argv, env=None):
        return subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--out", str(tmp_path / "o"), *map(str, argv)],
                              cwd=REPO, env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                              capture_output=True, text=True, timeout=120)

    def refused(proc, *words):
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stdout + proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr
        assert not (tmp_path / "o").exists() and not (tmp_path / "toy").exists()  # nothing ran, nothing made
        assert "== " not in proc.stdout

    toy = tmp_path / "toy"
    refused(run_sh("--toy", toy, "--init", tmp_path / "r50.pth"), f"--init file {tmp_path}/r50.pth not found")
    refused(run_sh("--toy", toy, "--seg_init", tmp_path / "r101.pth"), f"--seg_init file {tmp_path}/r101.pth not found")
    refused(run_sh("--toy", toy, "--clip", tmp_path / "ViT-B-32.pt"), f"--clip file {tmp_path}/ViT-B-32.pt not found")
    refused(run_sh("--toy", toy, "--backbone", "deit_b"), "--backbone deit_b unknown", "deit_s")
    voc = tmp_path / "VOC2012"
    voc.mkdir()
    refused(run_sh("--voc", voc, "--clip", "ViT-B/32"), "--seg_init FILE", "--no-seg")  # the segmenter needs ImageNet
    fake = tmp_path / "fake" / "pydensecrf"  # a pydensecrf that does not import, ahead of the real one
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libdensecrf.so: cannot open shared object file')\n")
    refused(run_sh("--toy", toy, env={"PYTHONPATH": str(tmp_path / "fake")}),
            "the dense CRF does not import", "libdensecrf.so", "pip install pydensecrf2")
    # a model name is not a file: --voc with ViT-B/32 passes the checks (--dry-run: runs nothing)
    proc = run_sh("--voc", voc, "--clip", "ViT-B/32", "--no-seg", "--dry-run", "--device", "cpu")
    assert proc.returncode == 0 and "== cam (dry run, not run): " in proc.stdout, proc.stdout + proc.stderr
    # --backbone reaches the CAM network only (the later stages read S from its checkpoint)
    proc = run_sh("--voc", voc, "--clip", "ViT-B/32", "--no-seg", "--dry-run", "--device", "cpu", "--backbone", "deit_s")
    cam = [line for line in proc.stdout.splitlines() if line.startswith("== cam ")]
    assert proc.returncode == 0 and cam and cam[0].endswith("--backbone deit_s"), proc.stdout + proc.stderr
    assert sum("--backbone" in line for line in proc.stdout.splitlines() if line.startswith("== ")) == 1


def test_run_sh_data_runs_a_users_folder_with_the_voc_recipe(tmp_path):
    """--data DIR: refused without --clip FILE; the stages get --dataset voc --data DIR (the VOC presets, the
    folder's class names); the lists as for --toy DIR. Printed with --dry-run, nothing trained."""
    import numpy as np
    from PIL import Image

    import make_pseudo
    import train_cam
    import train_seg
    from semples import datasets, presets, runtime

    data = tmp_path / "mine"
    (data / "ImageSets" / "Segmentation").mkdir(parents=True)
    (data / "JPEGImages").mkdir()
    (data / "class_names.txt").write_text("background\nkiln\nbarrow\n")
    (data / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (data / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    for i in "ab":
        Image.fromarray(np.zeros((375, 500, 3), np.uint8)).save(data / "JPEGImages" / f"{i}.jpg")
    clip, r50, r101 = (tmp_path / n for n in ("clip.pt", "r50.pth", "r101.pth"))
    for f in (clip, r50, r101):
        f.write_bytes(b"")

    def run_sh(*argv):
        return subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--data", str(data), "--out", str(tmp_path / "o"),
                               *map(str, argv)], cwd=REPO, env={**os.environ, "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=120)

    for argv, why in (((), "needs --clip FILE"), (("--clip", "ViT-B/32"), "ViT-B/32 is not a file")):
        proc = run_sh(*argv)
        assert proc.returncode == 2 and why in proc.stderr and "--data" in proc.stderr, proc.stderr
        assert not (tmp_path / "o").exists()
    proc = run_sh("--clip", clip, "--init", r50, "--seg_init", r101, "--device", "cpu", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "has no train_aug.txt: training on train.txt" in proc.stdout
    assert "== disk: the CAM files will take ~3 MB (3 x 2 train + 2 train images x ~358 KB); " in proc.stdout
    stages = {"cam": "train_cam.py", "match": "train_match.py", "prompt": "train_prompt.py", "refine": "train_refine.py",
              "pseudo": "make_pseudo.py", "seg": "train_seg.py", "seg_crf": "train_seg.py"}
    for step, script in stages.items():
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"== {step} (dry run, not run): "))
        assert f"{script} --dataset voc --data {data} " in line, line
        if step in ("match", "prompt", "refine"):
            assert f"--clip {clip} " in line, line
    # what --dataset voc --data DIR gives the stages: the VOC recipe, the folder's own classes
    cam = runtime.parse_args(train_cam.build_parser(), train_cam.PRESETS, ["--dataset", "voc", "--data", str(data)])
    assert (cam.backbone, cam.size) == ("resnet50", 448)
    pseudo = runtime.parse_args(make_pseudo.build_parser(), make_pseudo.PRESETS, ["--dataset", "voc", "--data", str(data)])
    assert pseudo.bg_threshold is None and presets.bg_threshold(pseudo.dataset, cam.backbone) == 0.15  # by S's family
    seg = runtime.parse_args(train_seg.build_parser(), train_seg.PRESETS, ["--dataset", "voc", "--data", str(data)])
    assert seg.backbone == "resnet101" and len(seg.test_scales) > 1
    assert datasets.read_class_names(str(data), "voc") == ["kiln", "barrow"]


def test_run_sh_refuses_unknown_flags_and_missing_data(tmp_path):
    bad = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--nope'" in bad.stderr
    missing = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--voc", str(tmp_path / "VOC2012")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "VOC2012 not found" in missing.stderr


def test_ablate_prints_the_three_tables_and_reuses_finished_runs(toy_world, tmp_path):
    out = tmp_path / "ablate"
    cmd = [sys.executable, os.path.join(REPO, "tools", "ablate.py"), "--dataset", "toy", "--data", toy_world["root"],
           "--clip", toy_world["clip"], "--seeds", "0", "--out", str(out),
           "--cam_args", "--epochs 1 --batch_size 16 --size 64 --workers 0",
           "--match_args", "--epochs 1 --batch_size 16 --workers 0",
           "--prompt_args", "--epochs 1 --batch_size 16 --workers 0 --prompt_length 4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "ablations.json").read_text())
    tables = report["tables"]
    assert len(tables) == 3 and len(tables["Table 4: losses"]) == 6 and len(tables["Table 6: training"]) == 2
    # the paper's grid 0.01-0.1 as multiples of its 0.05, around the toy preset's lambda 0.8
    assert [r for r in tables["Table 5: lambda"]] == ["stage (a) (start of c)", "lambda 0 (L_match only)",
                                                     "lambda 0.16", "lambda 0.32", "lambda 0.8", "lambda 1.6"]
    # every stage (c) run refines stage (a)'s S, as the pipeline does; the joint run has no stage (a)
    from semples import runtime
    seed0 = out / "seed0"
    init = {run: runtime.load_checkpoint(str(seed0 / run / "checkpoint.pt"), "mask_generator")["args"]["init"]
            for run in ("c_all", "c_lambda0", "c_unlearned", "joint")}
    assert init == {**{run: str(seed0 / "a" / "checkpoint.pt") for run in ("c_all", "c_lambda0", "c_unlearned")},
                    "joint": str(seed0 / "cam" / "checkpoint.pt")}, init
    for rows in tables.values():
        for cell in rows.values():
            assert 0 <= cell["mean"] <= 100 and cell["std"] == 0 and len(cell["per_seed"]) == 1
    assert "Table 6: training" in proc.stdout and "joint" in proc.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train_" not in again.stdout.split("seed 0", 1)[1].split("Table 4")[0]
    assert json.loads((out / "ablations.json").read_text())["runs"] == report["runs"]
    # another prompt flag: the prompts and every stage (c) run that reads them are redone, from scratch; the CAM
    # network, stage (a) and the joint run (no prompts file) are reused
    changed = subprocess.run(cmd[:-1] + [cmd[-1].replace("--prompt_length 4", "--prompt_length 5")], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    ran = changed.stdout.split("seed 0", 1)[1].split("Table 4")[0]
    assert "train_prompt.py" in ran and f"--out {seed0 / 'c_all'}" in ran
    assert "train_cam.py" not in ran and "train_match.py" not in ran and f"--out {seed0 / 'joint'}" not in ran
    prompts = torch.load(seed0 / "prompt_all" / "prompts.pt", weights_only=True)
    assert prompts["prompts"].shape[1] == 5 and prompts["epoch"] == 1


def test_run_sh_with_three_processes(tmp_path):
    """`run.sh --gpus 3` (torchrun, gloo on CPU): every training step runs under 3 processes although the batch
    sizes (16, 16, 16, 8) do not divide by 3, and the pipeline prints its table."""
    env = {**os.environ, **SMALL, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--toy", str(tmp_path / "toy"), "--out",
                           str(tmp_path / "out"), "--gpus", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node 3 train_seg.py" in proc.stdout
    assert "== seg_crf: " + sys.executable + " -m torch.distributed.run --standalone --nproc_per_node 3" in proc.stdout
    for crf in ("", r" \+ CRF"):
        assert re.search(rf"^segmenter on pseudo masks, val \(flip\){crf}\s+\d{{1,3}}\.\d\d$", proc.stdout, re.M), proc.stdout


def test_compare_clusters_arms_make_the_table_from_each_run(tmp_path, monkeypatch, capsys):
    """--arms without: one column pair, the cells are the mean and std of each run's results.json numbers."""
    from semples import runtime
    from tools import compare_clusters
    fake = {s: {row: {"seed_miou": 50.0 + s + i, "pseudo_miou": 60.0 + 2 * s + i}
                for i, row in enumerate(("cam", "a", "c"))} for s in (0, 1)}
    calls = []
    monkeypatch.setattr(compare_clusters, "pipeline", lambda args, arm, seed, log: calls.append(arm) or fake[seed])
    args = runtime.parse_args(compare_clusters.build_parser(), compare_clusters.PRESETS,
                             ["--dataset", "toy", "--seeds", "0", "1", "--arms", "without", "--out", str(tmp_path)])
    compare_clusters.main(args)
    out = capsys.readouterr().out
    assert calls == ["without", "without"] and "SemPLeS over pipeline seeds on toy" in out and "with)" not in out
    assert re.search(r"^stage \(a\) only: L_match\s+51\.50 \+- 0\.50\s+62\.00 \+- 1\.00$", out, re.M), out
    cells = json.loads((tmp_path / "clusters.json").read_text())["cells"]
    assert list(cells) == ["without"] and cells["without"]["c"]["seed_miou"]["per_seed"] == [52.0, 53.0]


def test_run_sh_reads_paths_as_the_caller_typed_them(tmp_path):
    """Called from another folder, relative paths are that folder's (a --toy folder of the user's is never swapped
    for a generated world in the repository); a PYTHON that is not an executable is refused, not replaced."""
    import numpy as np
    from PIL import Image

    mine = tmp_path / "mydata"
    (mine / "ImageSets" / "Segmentation").mkdir(parents=True)
    (mine / "JPEGImages").mkdir()
    (mine / "class_names.txt").write_text("kiln\n")
    for split in ("train", "val"):
        (mine / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("a\n")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(mine / "JPEGImages" / "a.jpg")
    (mine / "c.pt").write_bytes(b"")

    def run_sh(*argv, python=sys.executable):
        return subprocess.run(["bash", os.path.join(REPO, "run.sh"), *argv], cwd=tmp_path,
                              env={**os.environ, "PYTHON": python}, capture_output=True, text=True, timeout=120)

    proc = run_sh("--toy", "mydata", "--clip", "mydata/c.pt", "--out", "o", "--device", "cpu", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cam = next(ln for ln in proc.stdout.splitlines() if ln.startswith("== cam (dry run, not run): "))
    assert f"--data {mine} " in cam and f"--out {tmp_path / 'o' / 'cam'} " in cam, cam
    match = next(ln for ln in proc.stdout.splitlines() if ln.startswith("== match (dry run, not run): "))
    assert f"--clip {mine / 'c.pt'} " in match, match
    assert "== toy:" not in proc.stdout and not os.path.exists(os.path.join(REPO, "mydata"))
    proc = run_sh("--toy", "mydata", "--clip", "mydata/c.pt", "--dry-run", python="/no/such/python")
    assert proc.returncode == 2 and "PYTHON=/no/such/python is not an executable" in proc.stderr, proc.stderr
    bare = tmp_path / "python3"  # a python without the requirements (here: one that fails every import)
    bare.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    bare.chmod(0o755)
    proc = run_sh("--toy", "mydata", "--clip", "mydata/c.pt", "--dry-run", python=str(bare))
    assert proc.returncode == 2 and "cannot import the requirements" in proc.stderr, proc.stderr


def test_run_sh_under_torchrun_ends_with_the_stages_error(toy_world, tmp_path):
    """With --gpus N a stage's one-line error is printed last, not buried above torchrun's failure report."""
    world = tmp_path / "world"
    shutil.copytree(toy_world["root"], world)
    proc = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--toy", str(world), "--out", str(tmp_path / "o"),
                           "--gpus", "2", "--device", "cpu", "--no-seg"], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, "CAM_ARGS": "--epochs 0"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "train_cam.py: error: argument --epochs: 0 must be a positive integer", \
        proc.stderr[-3000:]
