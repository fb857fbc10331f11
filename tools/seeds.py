"""The README's toy results: `bash run.sh --no-seg` on several toy worlds and pipeline seeds, plus the control
(stage (a) trained on for stage (c)'s epochs with L_match alone, `train_refine.py --lambda_refine 0`), and a
table of mean +- std over the seeds.

    python tools/seeds.py --worlds 0 1 2 --seeds 0 1 2 --out out/seeds      # about 2 hours on 2 cores
    python tools/seeds.py --worlds 0 --seeds 0 1 2 --seg --out out/seeds_seg                   # + the segmenter
    python tools/seeds.py --worlds 0 --seeds 0 1 2 --seg --backbone deit_toy --out out/seeds_deit  # a DeiT S

World 0 is the default world (data/toy); world W > 0 is `tools/make_toy.py --seed W` in data/toy_wW. With
--generator make_toy2 the worlds are the second, independent generator's (`tools/make_toy2.py --seed W` in
data/toy2, data/toy2_wW), run as any VOC-layout folder with its own CLIP (run.sh --toy DIR):
    python tools/seeds.py --generator make_toy2 --worlds 0 --seeds 0 1 2 --out out/seeds_toy2

Each run is a plain `bash run.sh --toy DATA --seed S --out OUT/wW_sS --no-seg` (--seg: with the segmenter;
--backbone NAME: train_cam.py's S) with one thread (--jobs runs at once), so
run.sh's own step keys decide what is reused; the control reads that run's stage (a) and is keyed on its commands,
the code they run and the stage (a) checkpoint. Writes OUT/seeds.json (every number) and prints the table.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
from semples import runtime

ROWS = [("cam", "CAM network", "eval_cam"), ("a", "stage (a): L_match", "eval_match"),
        ("c", "SemPLeS (a)+(b)+(c)", "eval_refine"), ("control", "control (lambda 0)", "eval_control")]


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--worlds", type=runtime.nonnegative_int, nargs="+", default=[0, 1, 2],
                   help="toy worlds (make_toy --seed); 0 is the default world data/toy")
    p.add_argument("--generator", type=str, default="make_toy", choices=GENERATORS,
                   help="which tools/ script makes the worlds: make_toy (the default world) or make_toy2 (the second, "
                        "independent one)")
    p.add_argument("--seeds", type=runtime.nonnegative_int, nargs="+", default=[0, 1, 2], help="pipeline seeds")
    p.add_argument("--out", type=str, default=os.path.join(runtime.REPO, "out", "seeds"), help="output folder")
    p.add_argument("--jobs", type=runtime.positive_int, default=2, help="runs at once, one thread each")
    p.add_argument("--backbone", type=str, default=None,
                   help="run.sh --backbone: S of the CAM network (default: the toy preset's, the tiny ResNet)")
    p.add_argument("--seg", action="store_true", help="train and score the segmenter too (rows without and with CRF)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="run the control (lambda 0) too; --no-control leaves its rows out")
    return p


GENERATORS = {"make_toy": "toy", "make_toy2": "toy2"}  # script -> its worlds' folder name under data/


def world_dir(w, generator="make_toy"):
    name = GENERATORS[generator]
    return os.path.join(runtime.REPO, "data", name if w == 0 else f"{name}_w{w}")


def sh(cmd, log_path):
    """Run a command with one thread, its output appended to log_path; raise naming the log on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "a") as log:
        if subprocess.run(cmd, cwd=runtime.REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"failed: {' '.join(cmd)} (see {log_path})")


def file_hash(*paths):
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def control(data, seed, run):
    """Stage (c)'s training with lambda 0 from the run's stage (a), then the seeds step run.sh runs."""
    py, common = sys.executable, ["--dataset", "toy", "--data", data, "--device", "cpu", "--seed", str(seed)]
    cmds = [[py, "train_refine.py", *common, "--clip", os.path.join(data, "tiny_clip.pt"),
             "--init", os.path.join(run, "match", "checkpoint.pt"), "--prompts", os.path.join(run, "prompt", "prompts.pt"),
             "--lambda_refine", "0", "--out", os.path.join(run, "control")],
            [py, "make_pseudo.py", *common, "--checkpoint", os.path.join(run, "control", "checkpoint.pt"),
             "--split", "train", "--out", os.path.join(run, "eval_control")]]
    ev = os.path.join(run, "eval_control")
    scored = [[py, "eval_miou.py", "--dataset", "toy", "--data", data, "--split", "train", "--cams",
               os.path.join(ev, "cams"), "--t_start", "0.05", "--t_end", "0.95", "--json", os.path.join(ev, "seed.json")],
              [py, "eval_miou.py", "--dataset", "toy", "--data", data, "--split", "train", "--pred",
               os.path.join(ev, "masks"), "--json", os.path.join(ev, "mask.json")]]
    code = [os.path.join(runtime.REPO, f) for f in ("train_refine.py", "make_pseudo.py", "eval_miou.py")]
    code += sorted(os.path.join(d, f) for d in (os.path.join(runtime.REPO, "semples"), os.path.join(runtime.REPO, "clip"))
                   for f in os.listdir(d) if f.endswith(".py"))
    key = json.dumps([cmds, scored, file_hash(*code, os.path.join(run, "match", "checkpoint.pt"))])
    key_path = os.path.join(run, "control.key")
    if os.path.exists(key_path) and open(key_path).read() == key and os.path.exists(os.path.join(ev, "mask.json")):
        return
    for folder in ("control", "eval_control"):  # made by another command or code: from scratch
        subprocess.run(["rm", "-rf", os.path.join(run, folder)], check=True)
    for cmd in cmds + scored:
        sh(cmd, os.path.join(run, "control.log"))
    with runtime.atomic_path(key_path) as tmp, open(tmp, "w") as f:
        f.write(key)


def one(w, seed, out, backbone=None, seg=False, with_control=True, generator="make_toy"):
    run, data = os.path.join(out, f"w{w}_s{seed}"), world_dir(w, generator)
    os.makedirs(run, exist_ok=True)
    flags = (["--backbone", backbone] if backbone else []) + ([] if seg else ["--no-seg"])
    sh(["bash", "run.sh", "--toy", data, "--seed", str(seed), "--out", run, *flags], os.path.join(run, "run.log"))
    if with_control:
        control(data, seed, run)
    res = {}
    for key, _, folder in ROWS if with_control else ROWS[:3]:
        with open(os.path.join(run, folder, "seed.json")) as f:
            s = json.load(f)["miou"]
        with open(os.path.join(run, folder, "mask.json")) as f:
            m = json.load(f)["miou"]
        res[key] = {"seed_miou": round(s, 2), "pseudo_miou": round(m, 2)}
    if seg:
        with open(os.path.join(run, "results.json")) as f:
            r = json.load(f)
        res["seg"] = {"val_miou": r["segmenter_val_miou"], "val_miou_crf": r["segmenter_val_miou_crf"]}
    return res


def cell(values):
    v = np.asarray(values)
    return f"{v.mean():.2f} +- {v.std():.2f} ({' '.join(f'{x:.2f}' for x in v)})"  # numpy's std, ddof 0


def table(worlds, seeds, results, generator="make_toy"):
    """The printed table: per world, each row's mean +- std over the seeds and the per-seed values."""
    lines = []
    if generator != "make_toy":
        lines.append(f"worlds of tools/{generator}.py")
    lines.append(f"mIoU %, toy train, mean +- std over pipeline seeds {' '.join(map(str, seeds))} (per seed in brackets)")
    lines.append(f"{'':34s} {'seed (CAM)':36s} pseudo mask")
    for w in worlds:
        lines.append(f"world {w}" + (" (the default world)" if w == 0 and generator == "make_toy" else ""))
        runs = [results[f"w{w}_s{s}"] for s in seeds]
        rows = [row for row in ROWS if all(row[0] in r for r in runs)]  # --no-control: no control rows
        for key, name, _ in rows:
            lines.append(f"{name:34s} {cell([r[key]['seed_miou'] for r in runs]):36s} "
                          f"{cell([r[key]['pseudo_miou'] for r in runs])}")
        for other, name in (("a", "SemPLeS - stage (a)"), ("control", "SemPLeS - control")):
            if not all(other in r for r in runs):
                continue
            lines.append(f"{name:34s} {cell([r['c']['seed_miou'] - r[other]['seed_miou'] for r in runs]):36s} "
                          f"{cell([r['c']['pseudo_miou'] - r[other]['pseudo_miou'] for r in runs])}")
        if all("seg" in r for r in runs):
            lines.append(f"{'segmenter, val (no CRF / CRF)':34s} {cell([r['seg']['val_miou'] for r in runs]):36s} "
                          f"{cell([r['seg']['val_miou_crf'] for r in runs])}")
    return "\n".join(lines)


def main(args):
    runtime.make_dir(args.out)
    for w in args.worlds:  # each world whole (dataset and tiny CLIP) before any run reads it
        print(f"== world {w}: {world_dir(w, args.generator)}", flush=True)
        sh([sys.executable, f"tools/{args.generator}.py", "--out", world_dir(w, args.generator), "--seed", str(w)],
           os.path.join(args.out, f"{args.generator}_w{w}.log"))
    jobs = [(w, s) for w in args.worlds for s in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(one, *job, args.out, args.backbone, args.seg, args.control, args.generator)
                   for job in jobs}
        results = {f"w{w}_s{s}": futures[(w, s)].result() for w, s in jobs}
    with runtime.atomic_path(os.path.join(args.out, "seeds.json")) as tmp, open(tmp, "w") as f:
        json.dump({"generator": args.generator, "worlds": args.worlds, "seeds": args.seeds, "backbone": args.backbone,
                   "seg": args.seg, "runs": results}, f, indent=1)
    if args.backbone:
        print(f"S: {args.backbone}")
    print(table(args.worlds, args.seeds, results, args.generator))
    print(f"results: {os.path.join(args.out, 'seeds.json')}")


if __name__ == "__main__":
    main(build_parser().parse_args())
