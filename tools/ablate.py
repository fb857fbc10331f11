"""The paper's ablations on one dataset, each cell a mean +- std of seed mIoU (train list, best threshold of a
sweep) over pipeline seeds:
    Table 4  L_match only | + L_refine with unlearned prompts | + L_prompt^T only | + L_prompt^I only | all
    Table 5  lambda = 0, 0.01, 0.02, 0.05, 0.1 (VOC; other presets: the same multiples of their lambda)
    Table 6  sequential (a) -> (b) -> (c)  vs  joint training of S and the prompts
Every stage (c) run starts from stage (a)'s S, as the pipeline's does; lambda 0 is then stage (a) trained on
with L_match alone (the control for what L_refine adds). The joint run has no stage (a): it starts from the
CAM network.

Toy world (2-core CPU: 27 min a seed alone at torch's two threads, about 80 min for three; data/toy must
exist: `python tools/make_toy.py`):
    python tools/ablate.py --dataset toy --seeds 0 1 2 --out out/toy_ablate

It runs the stage scripts as a user would (train_cam, train_match, train_prompt, train_refine, make_pseudo
--cams_only, eval_miou --cams), one folder per run under OUT/seed{S}/, each keyed (OUT/seed{S}/RUN/key.txt) on
its command and the code it runs, and on the runs it reads. A finished run with the same key is reused, an
interrupted one resumes from its checkpoint, and one made otherwise (another preset, an edited loss) is removed
and redone. Writes OUT/ablations.json (every run's seed mIoU and each cell's mean and std) and prints the
three tables. Extra flags for every S-training stage go through --match_args.
"""
import glob
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
from semples import presets, runtime

# Table 5's grid: the paper's lambdas 0.01, 0.02, 0.05, 0.1 as multiples of its VOC lambda 0.05, so that the
# sweep brackets each preset's lambda the same way (VOC: the paper's values; toy 0.8: 0.16, 0.32, 0.8, 1.6).
LAMBDA_GRID = (0.2, 0.4, 1.0, 2.0)


def lambdas(lambda_preset):
    return [round(lambda_preset * f, 6) for f in LAMBDA_GRID]


# run name -> (prompt variant or None, stage (c) flags). Stage (c) starts from stage (a)'s S, so "a" (stage (a)
# itself) and "c_lambda0" (stage (a) trained on with L_match alone, the same schedule as stage c) are both kept.
PROMPTS = {"all": [], "unlearned": ["--epochs", "0"], "T_only": ["--no-image_term"], "I_only": ["--lambda_T", "0"]}


def refine_runs(lambda_preset):
    runs = {f"c_{p}": (p, []) for p in PROMPTS}
    runs.update({f"c_lambda{lam}": ("all", ["--lambda_refine", str(lam)]) for lam in lambdas(lambda_preset)
                 if lam != lambda_preset})
    runs["c_lambda0"] = ("all", ["--lambda_refine", "0"])
    runs["joint"] = (None, ["--joint"])  # no stage (a) here: S starts from the CAM network
    return runs


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--data", type=str, default=None, help="dataset root (preset sets it)")
    p.add_argument("--clip", type=str, default=None, help="CLIP name or file (preset sets it)")
    p.add_argument("--out", type=str, default=None, help="output folder")
    p.add_argument("--device", type=runtime.device_name, default="cpu", help="device of every stage")
    p.add_argument("--seeds", type=runtime.nonnegative_int, nargs="+", default=[0, 1, 2], help="pipeline seeds")
    p.add_argument("--lambda_refine", type=runtime.nonnegative_float, default=None,
                   help="stage (c)'s preset lambda (the 'all' row); default: train_refine.py's for the dataset")
    p.add_argument("--match_args", type=str, default="", help="extra flags for train_match and train_refine")
    p.add_argument("--cam_args", type=str, default="", help="extra flags for train_cam")
    p.add_argument("--prompt_args", type=str, default="", help="extra flags for train_prompt")
    return p


PRESETS = presets.of("ablate")


def run(log, *cmd):
    t0 = time.time()
    stdout = runtime.run_command([sys.executable, *cmd])
    log(f"  {time.time() - t0:6.1f}s  {' '.join(cmd)}")
    return stdout


def finished(path):
    """Whether a stage's checkpoint says it is done."""
    try:
        return bool(torch.load(path, map_location="cpu", weights_only=True).get("done"))
    except (OSError, RuntimeError, EOFError, ValueError):
        return False


# The modules every script shares (run.sh's code key holds the same): an edit to any of them, or to a preset in
# them, changes what a run produces.
SHARED = sorted(os.path.relpath(f, runtime.REPO) for pattern in ("semples/*.py", "clip/*.py")
                for f in glob.glob(os.path.join(runtime.REPO, pattern)))


def run_key(*cmds, after=""):
    """What a run's output is keyed on: its commands, the code they run (the scripts they name and SHARED) and
    `after`, the keys of the runs whose outputs it reads."""
    h = hashlib.sha256(repr((cmds, after)).encode())
    for f in [w for cmd in cmds for w in cmd if w.endswith(".py")] + SHARED:
        with open(os.path.join(runtime.REPO, f), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def inputs_key(data, clip):
    """The dataset's files and the CLIP (a file, or a model name) by name, size and time, as run.sh keys its
    steps: an edited mask or another CLIP file redoes every run."""
    h = hashlib.sha256(clip.encode())
    for path in [clip] + sorted(glob.glob(os.path.join(data, "**"), recursive=True)):
        if os.path.isfile(path):
            st = os.stat(path)
            h.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fresh(folder, key):
    """True if `folder` was started by a run with this key (finished or to resume). Otherwise the folder is
    removed (made by another command, preset or code, or of unknown origin) and started anew under the key."""
    path = os.path.join(folder, "key.txt")
    if os.path.exists(path):
        with open(path) as f:
            if f.read().strip() == key:
                return True
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with runtime.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(key + "\n")
    return False


def train(log, script, out, *args, after=""):
    """Run a training stage unless `out` holds its finished output with the same key; returns the key."""
    cmd = (script, *args, "--out", out)
    key = run_key(cmd, after=after)
    name = "prompts.pt" if script == "train_prompt.py" else "checkpoint.pt"
    if not (fresh(out, key) and finished(os.path.join(out, name))):
        run(log, *cmd)
    return key


def seed_miou(log, base, name, ckpt, out, after):
    """Seed mIoU of S's CAMs on the train list (best threshold of a 0.05-0.95 sweep); `after`: the key of the
    run that made `ckpt`."""
    folder = os.path.join(out, name)
    result = os.path.join(folder, "seed.json")
    cams = ("make_pseudo.py", *base, "--checkpoint", ckpt, "--split", "train", "--out", folder, "--cams_only")
    score = ("eval_miou.py", "--dataset", base[1], "--data", base[3], "--split", "train", "--cams",
             os.path.join(folder, "cams"), "--t_start", "0.05", "--t_end", "0.95", "--json", result)
    if not (fresh(folder, run_key(cams, score, after=after)) and os.path.exists(result)):
        run(log, *cams)
        run(log, *score)
    with open(result) as f:
        return json.load(f)["miou"]


def one_seed(args, seed, log, inputs):
    out = os.path.join(args.out, f"seed{seed}")
    base = ["--dataset", args.dataset, "--data", args.data, "--device", args.device, "--seed", str(seed)]
    clip_flag = ["--clip", args.clip]
    m_args, c_args, p_args = (shlex.split(a) for a in (args.match_args, args.cam_args, args.prompt_args))
    cam, stage_a = os.path.join(out, "cam", "checkpoint.pt"), os.path.join(out, "a", "checkpoint.pt")
    k_cam = train(log, "train_cam.py", os.path.join(out, "cam"), *base, *c_args, after=inputs)
    miou = {"cam": seed_miou(log, base, "eval_cam", cam, out, k_cam)}
    k_a = train(log, "train_match.py", os.path.join(out, "a"), *base, *clip_flag, "--init", cam, *m_args,
                after=k_cam)
    miou["a"] = seed_miou(log, base, "eval_a", stage_a, out, k_a)
    k_prompt = {p: train(log, "train_prompt.py", os.path.join(out, f"prompt_{p}"), *base, *clip_flag, "--match",
                         stage_a, *p_args, *flags, after=k_a) for p, flags in PROMPTS.items()}
    for name, (p, flags) in refine_runs(args.lambda_refine).items():
        prompts = ["--prompts", os.path.join(out, f"prompt_{p}", "prompts.pt")] if p else []
        k = train(log, "train_refine.py", os.path.join(out, name), *base, *clip_flag, "--init", stage_a if p else cam,
                  "--lambda_refine", str(args.lambda_refine), *prompts, *m_args, *flags,
                  after=(k_a, k_prompt[p]) if p else k_cam)
        miou[name] = seed_miou(log, base, f"eval_{name}", os.path.join(out, name, "checkpoint.pt"), out, k)
    return miou


def tables(lam):
    """(title, [(row label, run name)]) of the paper's Tables 4, 5 and 6."""
    grid = lambdas(lam)
    lam_rows = [("stage (a) (start of c)", "a"), ("lambda 0 (L_match only)", "c_lambda0")] + [
        (f"lambda {v}", "c_all" if v == lam else f"c_lambda{v}") for v in grid]
    if lam not in grid:
        lam_rows.append((f"lambda {lam} (preset)", "c_all"))
    return [
        ("Table 4: losses", [("CAM network (start of a)", "cam"), ("L_match only (stage a)", "a"),
                             ("+ L_refine, unlearned prompts", "c_unlearned"), ("+ L_prompt^T only", "c_T_only"),
                             ("+ L_prompt^I only", "c_I_only"), ("all (SemPLeS)", "c_all")]),
        ("Table 5: lambda", lam_rows),
        ("Table 6: training", [("sequential a -> b -> c", "c_all"), ("joint (from the CAM network)", "joint")]),
    ]


def main(args):
    args.clip = args.clip or presets.DATASETS[args.dataset]["clip"]
    log = runtime.Logger(args.out)
    runtime.save_args(args, args.out)
    per_seed = {}
    for seed in args.seeds:
        log(f"seed {seed}")
        per_seed[seed] = one_seed(args, seed, log, inputs_key(args.data, args.clip))
    names = per_seed[args.seeds[0]].keys()
    cells = {n: {"mean": float(np.mean([per_seed[s][n] for s in args.seeds])),
                 "std": float(np.std([per_seed[s][n] for s in args.seeds])),
                 "per_seed": [per_seed[s][n] for s in args.seeds]} for n in names}
    report = {"dataset": args.dataset, "seeds": args.seeds, "lambda_refine": args.lambda_refine,
              "metric": "seed mIoU %, train list, best threshold of a 0.05-0.95 sweep", "runs": cells,
              "tables": {title: {label: cells[n] for label, n in rows} for title, rows in tables(args.lambda_refine)}}
    with runtime.atomic_path(os.path.join(args.out, "ablations.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    for title, rows in tables(args.lambda_refine):
        log(f"\n{title} (seed mIoU, mean +- std over seeds {args.seeds})")
        for label, n in rows:
            log(f"  {label:34s} {cells[n]['mean']:6.2f} +- {cells[n]['std']:.2f}   "
                + " ".join(f"{v:.2f}" for v in cells[n]["per_seed"]))
    log(f"written: {os.path.join(args.out, 'ablations.json')}")


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
