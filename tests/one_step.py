"""Test helper (tests/test_distributed.py): run a stage's real main() and keep what its first optimisation
step applies: the gradient of every parameter the optimizer steps, and every value the stage reduces over
processes for its log (runtime.all_reduce_mean: the losses). Under DDP the gradients seen by the optimizer
are already averaged over the processes, so they are the step's gradient.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/one_step.py RESULT.pt SCRIPT FLAGS...

Rank 0 writes RESULT.pt: {"grads": [tensor or None, in the optimizer's order], "logged": [float, ...]}.
In one process, call run(SCRIPT, FLAGS) and get the same dict back.
"""
import importlib
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from semples import runtime


def run(script, argv):
    """main() of `script` (e.g. 'train_match.py') with `argv`; returns the first step's gradients and the
    logged values."""
    module = importlib.import_module(os.path.basename(script)[:-3])
    seen = {"grads": None, "logged": []}

    def keep_gradients(opt, args, kwargs):
        if seen["grads"] is None:
            seen["grads"] = [None if p.grad is None else p.grad.detach().cpu().clone()
                             for g in opt.param_groups for p in g["params"]]

    real_mean = runtime.all_reduce_mean

    def keep_logged(value, world):
        mean = real_mean(value, world)
        seen["logged"].append(mean)
        return mean

    hook = register_optimizer_step_pre_hook(keep_gradients)
    runtime.all_reduce_mean = keep_logged
    try:
        module.main(runtime.parse_args(module.build_parser(), module.PRESETS, argv))
    finally:
        hook.remove()
        runtime.all_reduce_mean = real_mean
    return seen


if __name__ == "__main__":
    result, script, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    seen = run(script, flags)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(seen, result)
