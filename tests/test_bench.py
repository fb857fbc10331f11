"""bench.py runs (toy shapes, one step each) and writes every figure it prints: the smoke test of the benchmark;
its timings are measured by the command in the README, never by a test."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import pytest


@pytest.mark.parametrize("backbone", ["resnet", "deit"])
def test_bench_smoke(tmp_path, backbone):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench.py"), "--dataset", "toy", "--device", "cpu",
                           "--steps", "1", "--images", "2", "--pairs", "4", "--workers", "2", "--batch", "4",
                           "--batch_b", "8", "--json", str(out), "--backbone", backbone], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    r = report["results"]["fp32"]
    assert set(report["results"]) == {"fp32"}  # bf16 is CUDA only
    assert report["shapes"].startswith(f"S {'deit_toy' if backbone == 'deit' else 'tiny'} at 96")
    for key in ("cam_network_ms_per_step",
                "stage_a_ms_per_step", "stage_c_ms_per_step", "stage_b_epoch_s_cached", "stage_b_epoch_s_uncached",
                "cams_img_per_s", "crf_img_per_s_1_workers", "crf_img_per_s_2_workers", "eval_s_0_workers",
                "eval_s_2_workers"):
        assert r[key] > 0, key
    assert f"{r['stage_a_ms_per_step']:.0f} ms" in proc.stdout and f"{r['cams_img_per_s']:.1f} img/s" in proc.stdout
