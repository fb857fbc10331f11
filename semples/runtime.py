"""Run-time plumbing every script shares: the command line (presets, number types, one-line errors), seeding,
the device and torchrun, bf16 autocast, lr schedules, atomic writes, checkpoints, resume and the log."""
import argparse
import contextlib
import errno
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import torch
import torch.distributed as dist

# The repository root: preset paths under data/ and out/ are its, wherever a script runs from.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# Command line: `--dataset` picks a preset, explicit flags override it
# ----------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def new_parser(doc):
    """Every script's parser: the module docstring as description, defaults shown in --help, and no
    abbreviations (`--epoch 1` must not silently mean `--epochs 1`)."""
    return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter, allow_abbrev=False)


def _number(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
unit_float = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
unit_below_one = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def float_list(text):
    """A comma list of positive numbers ('1.0,0.5'), e.g. --scales."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers (e.g. 1.0,0.75)")
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list one or more positive numbers")
    return values


def device_name(text):
    """cpu, cuda or cuda:N (whether CUDA is there is checked by setup_device)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return text


def parse_args(parser, presets, argv=None):
    """Parse `argv` with per-dataset defaults: `presets[name]` is a dict of flag defaults for each of
    voc/coco/toy; flags given on the command line always win over the preset. `--dataset NAME --help`
    shows NAME's defaults, and the help ends with every preset's values."""
    parser.add_argument("--dataset", type=str, default="voc", choices=sorted(k for k in presets if "/" not in k),
                        help="preset of per-dataset defaults (paper's VOC/COCO settings, or the toy world); "
                             "`--dataset NAME --help` shows NAME's defaults")
    flags = {a.dest for a in parser._actions}
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --dataset alone, before --help runs
    pre.add_argument("--dataset", type=str, default="voc")
    if "backbone" in flags:  # a row "NAME/deit" holds the DeiT S's recipe (train_cam.py --backbone deit_s)
        pre.add_argument("--backbone", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    parser.epilog = presets_help(presets, flags)
    row = presets.get(known.dataset, presets["voc"])
    backbone = getattr(known, "backbone", None) or row.get("backbone", "")
    if backbone.startswith("deit"):
        row = {**row, **presets.get(f"{known.dataset}/deit", {})}
    parser.set_defaults(**{k: _repo_path(v) for k, v in row.items()})
    args = parser.parse_args(argv)
    for k, v in vars(args).items():
        if isinstance(v, str) and "{data}" in v:
            setattr(args, k, v.replace("{data}", args.data))
    return args


def run_cli(main, parser, presets=None, argv=None, hold=None):
    """A script's command line: parse `argv` (with the --dataset presets, if given), then main(args) inside
    `hold(args)`: by default, for a stage (presets given), hold_folder on its --out (rank 0 under torchrun); a
    tool without presets holds nothing unless it says what. A ValueError, FileNotFoundError, diverged loss or full
    disk (the clear messages our checks raise) ends as `script: error: message` with exit status 1, not a
    traceback; SEMPLES_TRACEBACK=1 shows the traceback."""
    args = parser.parse_args(argv) if presets is None else parse_args(parser, presets, argv)
    if hold is None:
        hold = hold_out if presets is not None else (lambda _: contextlib.nullcontext())
    try:
        with hold(args):
            return main(args)
    except (ValueError, OSError, FloatingPointError) as e:
        clear = isinstance(e, (ValueError, FileNotFoundError, FloatingPointError)) or e.errno == errno.ENOSPC
        if not clear or os.environ.get("SEMPLES_TRACEBACK"):
            raise
        parser.exit(1, f"{parser.prog}: error: {one_line(e)}\n")


def hold_out(args):
    """A stage's hold: its --out folder (hold_folder), by rank 0 alone under torchrun."""
    out = getattr(args, "out", None)
    return hold_folder(out) if out and int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()


def one_line(e):
    """An error's own message. Raised in a DataLoader worker, it arrives wrapped in the worker's traceback
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."), whose last line is it."""
    msg = str(e)
    if "Original Traceback (most recent call last)" in msg:
        last = msg.rstrip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def _repo_path(value):
    """A preset's relative path under data/ or out/ is the repository's, not the working directory's."""
    if isinstance(value, str) and value.split("/")[0] in ("data", "out"):
        return os.path.join(REPO, value)
    return value


def presets_help(presets, flags):
    """The help's epilog: each preset's values of this script's flags, one paragraph per preset."""
    lines = textwrap.wrap("presets (--dataset NAME sets these defaults; a flag given on the command line wins; "
                          "data/ and out/ are the repository's, {data} is the --data folder):", 100)
    for name in sorted(presets):
        line = f"  {name}:"
        for pair in (f"--{k} {v}" for k, v in presets[name].items() if k in flags):
            if len(line) + 1 + len(pair) > 100:
                lines.append(line)
                line = "     "
            line += " " + pair
        lines.append(line)
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------------
# Seeding, device, torchrun
# ----------------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_device(name):
    """Pick the device once. Under torchrun (WORLD_SIZE > 1) also join the process group: NCCL on CUDA,
    one process per GPU. Returns (device, rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if name.startswith("cuda"):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise ValueError(f"--device {name} asked for, but no CUDA device is visible; pass --device cpu")
        index = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.device(name).index or 0
        if index >= visible:
            raise ValueError(f"--device {name}: GPU {index} asked for (LOCAL_RANK under torchrun), but only "
                             f"{visible} visible; use fewer processes per node or another --device")
    if world > 1 and dist.is_initialized():  # a second call in the same process
        device = torch.device("cuda", torch.cuda.current_device()) if name.startswith("cuda") else torch.device(name)
        return device, dist.get_rank(), world
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if name.startswith("cuda"):
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device(name)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device, dist.get_rank(), world
    return torch.device(name), 0, 1




def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_device():
    """Where a tensor to all_reduce must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_mean(value, world):
    """Average a python float over processes (for logging)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.item() / world


def rank_share(batch, rank, world, flag="--batch_size"):
    """This process's slice (start, stop) of a global batch of `batch` items, as even as possible: the first
    batch % world processes take one more. The slices of all processes are the 1-process batch, in order, so
    any process count trains on the same batches (global_mean_weight makes the gradient the same too)."""
    if world > batch:
        raise ValueError(f"{flag} {batch} is smaller than the {world} processes (each needs at least one item "
                         f"of every batch); raise {flag} or use fewer processes")
    base, extra = divmod(batch, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def global_mean_weight(count, world):
    """The factor that turns this process's mean loss (over its `count` pairs, images or pixels) into its
    part of the mean over the whole global batch, as DDP sees it. DDP averages gradients over processes,
    and a plain average of per-process means is not the global mean when processes hold different counts
    (an uneven batch split, or a different number of classes per image): weighting each local mean by
    count * world / (count summed over processes) makes DDP's average exactly the 1-process gradient.
    1.0 in one process, so single-process runs compute what they always did."""
    if world == 1:
        return 1.0
    total = torch.tensor([float(count)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(total)  # a count, no gradient (not all_reduce_mean: that one is the log's reduction)
    return count * world / total.item()


def average_gradients(params, world):
    """Average gradients over processes, as DDP does for the module it wraps, for one it does not wrap."""
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def autocast(device, enabled):
    """bf16 autocast on CUDA (no loss scaler needed); plain fp32 on CPU, where it would only be slower."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def poly_lr(base_lr, step, total_steps, power=0.9):
    """The poly schedule of DeepLab and IRN: base_lr * (1 - step / total_steps) ** power."""
    return base_lr * (1 - step / total_steps) ** power


def cosine_lr(base_lr, step, total_steps, warmup_steps=0, min_lr=0.0):
    """Linear warm-up to base_lr over `warmup_steps`, then cosine from base_lr down to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, logs
# ----------------------------------------------------------------------------------------------
DISK_NEARLY_FULL = 16 * 2**20  # bytes; below this a failed write is blamed on the disk


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; rename it onto `path` only if the block succeeds, so a
    killed run never leaves a half-written file under the real name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs should be as readable as open() makes them
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # A full disk surfaces as torch's "unexpected pos" or an iostream error that names neither the file nor
        # the cause (seen in CI); say both. Checked before the partial file is removed, while the disk is full.
        free = shutil.disk_usage(folder).free
        if getattr(e, "errno", None) == errno.ENOSPC or free < DISK_NEARLY_FULL:
            written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
            raise OSError(errno.ENOSPC, f"could not write {path}: its disk is full ({free / 2**20:.0f} MiB free "
                                        f"with {written / 2**20:.0f} MiB of the file written); free space there "
                                        f"or write the outputs elsewhere (--out)") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


LOCK = ".lock"  # in a run's --out folder while a run writes there: "pid@host"


def lock_holder(folder):
    """The pid of the live run holding `folder` (hold_folder), or None."""
    pid, host = _lock_owner(os.path.join(folder, LOCK))
    return pid if pid is not None and _alive(pid, host) else None


def need_dir(path, what, hint):
    """`path` if it is a folder, else FileNotFoundError naming it, what it is for and what to do."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} not found: {hint}")
    return path


def read_json(path):
    """A JSON file's content, or None where it is missing or unreadable (e.g. half-written by a killed run): for
    records a tool checks before reusing its own work (the toy worlds' meta files)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def need_file(path, what, hint):
    """`path` if it is a file, else FileNotFoundError naming it, what it is for and what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found: {hint}")
    return path


def _lock_owner(path):
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition("@")
        return int(pid), host
    except (OSError, ValueError):
        return None, None  # unreadable or half-written: taken as stale


def _alive(pid, host):
    if host != os.uname().nodename:
        return True  # another machine's (a shared disk): cannot tell, so it counts as running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def hold_folder(folder, flag="--out"):
    """Hold an output folder while a run writes there: a second run into it is refused, naming the folder and
    the other run's pid (two runs into one folder interleave their logs, checkpoints and masks). A lock whose
    process is gone is taken over, and the temporary files a killed run left there (atomic_path's) are removed.
    Folders below it holding their own lock are another run's: left alone."""
    make_dir(folder, flag)
    path, me = os.path.join(folder, LOCK), f"{os.getpid()}@{os.uname().nodename}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _lock_owner(path)
            if pid is not None and _alive(pid, host):
                where = "" if host == os.uname().nodename else f" on {host}"
                raise ValueError(f"{flag} {folder} is in use by another run (pid {pid}{where}): wait for it to end or "
                                 f"stop it, or pass another {flag}; if no such run exists, remove {path}") from None
            try:
                os.remove(path)  # stale: its run is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not os.path.exists(os.path.join(root, d, LOCK))]
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):  # atomic_path's names
                    os.remove(os.path.join(root, name))
        yield
    finally:
        if _lock_owner(path) == (os.getpid(), os.uname().nodename):
            os.remove(path)


def write_if_changed(path, text):
    """Write `text` (atomically) unless the file already holds exactly it: 'written', 'replaced' or 'kept', so that
    a rerun leaves a file, and its time, untouched."""
    state = "written"
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return "kept"
        state = "replaced"
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return state


def save_checkpoint(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_torch_file(path, flag, hint):
    """torch.load (weights only, on CPU) with errors that name the file, the flag and what to do."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} not found: {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{flag} {path} is not a readable torch file ({e}): {hint}") from e


def load_checkpoint(path, kind, flag="--init", finished=False):
    """Load a checkpoint dict written by one of our stages and check it holds `kind`
    ('mask_generator', 'prompts', 'segmenter'). `finished`: refuse one whose run stopped before its last epoch
    (killed, or --stop_after): an input to the next stage must be a finished result, not a snapshot."""
    ckpt = read_torch_file(path, flag, "run the stage that writes it first (see README), or point the flag at "
                                       "an existing checkpoint")
    return check_checkpoint(ckpt, path, kind, flag, finished)


def check_checkpoint(ckpt, path, kind, flag="--init", finished=False):
    """load_checkpoint's checks on a dict already read from `path`."""
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} (flag {flag}) holds '{found}', expected a '{kind}' checkpoint")
    if finished and ckpt.get("done") is False:
        at = (f"iteration {ckpt['iter']}/{ckpt['iters']}" if "iter" in ckpt else
              f"epoch {ckpt.get('epoch')}/{ckpt.get('epochs')}")
        raise ValueError(f"{flag} {path} is unfinished ({at}): rerun the stage that wrote it with the same flags "
                         "(it resumes) until it finishes, then pass it")
    return ckpt


def make_dir(path, flag="--out"):
    """Create an output folder, or say which flag names a folder that cannot be one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a file where a folder is needed; pass another path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be created ({e.strerror}: {e.filename or path}); pass a folder "
                         "that can be") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} is not writable; pass a folder you can write to")
    return path


class Logger:
    """Print and append to OUT/log.txt (rank 0 only). One greppable line per epoch is the convention."""

    def __init__(self, out_dir, rank=0):
        self.path = os.path.join(out_dir, "log.txt") if rank == 0 else None
        if self.path:
            make_dir(out_dir, "--out")

    def __call__(self, msg):
        if self.path:
            print(msg, flush=True)
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


def save_args(args, out_dir, name="args.json"):
    with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)


def epoch_line(log, stage, epoch, epochs, means, lr, seconds):
    """The one greppable line per epoch: `epoch 3/6 [match] loss 1.2345 ... lr 1.00e-03 time 12.3s`."""
    log(f"epoch {epoch}/{epochs} [{stage}] " + " ".join(f"{n} {v:.4f}" for n, v in means.items())
        + f" lr {lr:.2e} time {seconds:.1f}s")


# Flags that do not change what a run computes: a resumed run may differ in these.
RESUME_FREE = {"device", "workers", "resume", "out"}


def check_resume(saved, current, path, free=()):
    """Refuse to resume a run whose result-shaping flags changed (it would mix two experiments). `free`:
    the stage's own flags that shape no result (besides RESUME_FREE)."""
    skip = RESUME_FREE | set(free)
    diff = sorted(k for k in set(saved) | set(current) if k not in skip and saved.get(k) != current.get(k))
    if "data_key" in diff:
        raise ValueError(f"{path} was trained on other data: the image list, the labels or an image file changed "
                         "since (--data holds the same names, other contents); pass --no-resume or another --out to "
                         "start afresh on the data as it is now")
    if diff:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:4])
        raise ValueError(f"{path} was made with other flags ({detail}); rerun with those flags to resume, "
                         "or pass --no-resume / another --out to start afresh")


def resume_or_start(args, path, kind, log, rank, free=()):
    """The checkpoint at `path` to resume from (its flags checked by check_resume), or None for a fresh
    start: then rank 0 writes OUT/args.json, and with --no-resume first removes the old checkpoint, said in
    the log, rather than leave it until the first save (a run killed before that would leave another
    experiment's state to be resumed from)."""
    if args.resume and os.path.exists(path):
        ckpt = load_checkpoint(path, kind, "--out")
        check_resume(ckpt["args"], vars(args), path, free)
        return ckpt
    if rank == 0:
        if not args.resume and os.path.exists(path):
            os.remove(path)
            log(f"--no-resume: removed the old {path}; starting afresh")
        save_args(args, args.out)
    return None


def run_command(cmd, env=None):
    """Run another script of the repository (ablate.py, compare_clusters.py), from the repository root;
    returns its stdout, or raises with the command and the ends of its output."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def progress(iterable, desc, enabled=True, total=None):
    """tqdm on an interactive terminal, silent in logs and CI (the epoch line says what matters)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def add_common_flags(parser):
    """Flags every stage has, with one meaning everywhere."""
    parser.add_argument("--data", type=str, default=None, help="dataset root in VOC layout (preset sets it)")
    parser.add_argument("--device", type=device_name, default=default_device(), help="cuda, cuda:1 or cpu")
    parser.add_argument("--seed", type=nonnegative_int, default=504, help="random seed (the authors' release uses 504)")
    parser.add_argument("--workers", type=nonnegative_int, default=2, help="data-loading worker processes")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast on CUDA (ignored on CPU)")
    return parser
