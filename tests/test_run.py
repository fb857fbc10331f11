"""run.sh end to end on a very small toy configuration: every step runs, the table is printed with
numbers, and a second run skips the finished steps."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    "TOY_ARGS": "--n_train 48 --n_val 16 --n_train_subset 16 --size 64 --clip_steps 20 --clip_batch 32",
    "MATCH_ARGS": "--cls_epochs 1 --epochs 1 --batch_size 16 --size 64 --workers 0",
    "REFINE_ARGS": "--epochs 1 --batch_size 16 --size 64 --workers 0",
    "PROMPT_ARGS": "--epochs 2 --batch_size 16 --size 64 --workers 0",
    "PSEUDO_ARGS": "--workers 0",
    "SEG_ARGS": "--iters 10 --crop 48 --batch_size 8 --workers 0",
}


def test_run_sh_prints_the_table(tmp_path):
    env = {**os.environ, **SMALL, "PYTHON": sys.executable}
    cmd = ["bash", os.path.join(REPO, "run.sh"), "--toy", str(tmp_path / "toy"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    number = r"\d{1,3}\.\d\d"
    for row in ("CAM network before matching", "stage (a) only: L_match", "SemPLeS (a)+(b)+(c)"):
        assert re.search(rf"^{re.escape(row)}\s+{number} t=0\.\d+\s+{number}$", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^segmenter on pseudo masks, val\s+{number}$", proc.stdout, re.M), proc.stdout
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "== match: done, skipped" in again.stdout
    assert again.stdout.splitlines()[-4:] == proc.stdout.splitlines()[-4:]


def test_run_sh_refuses_unknown_flags_and_missing_data(tmp_path):
    bad = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--nope'" in bad.stderr
    missing = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--voc", str(tmp_path / "VOC2012")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "VOC2012 not found" in missing.stderr
