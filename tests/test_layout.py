"""The reference layout: stage scripts on top, the library in semples/, tools apart; no script imports a script;
every preset value sits in semples/presets.py and names a flag its stage has."""
import ast
import glob
import os

import pytest

from semples import presets, runtime
import train_match
import train_refine

REPO = runtime.REPO
STAGES = ["train_cam", "train_match", "train_prompt", "train_refine", "make_pseudo", "train_seg", "eval_miou"]
TOOLS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "tools", "*.py")))

pytestmark = pytest.mark.smoke


def imported_modules(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
            if node.module == "tools":
                names |= {a.name for a in node.names}
    return names


def test_top_level_holds_the_stage_scripts_only():
    scripts = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py")))
    assert scripts == sorted(STAGES)
    assert {"make_toy", "report", "ablate", "bench", "compare_clusters", "seeds"} <= set(TOOLS)


def test_no_script_imports_a_script():
    for name in STAGES:
        assert not imported_modules(os.path.join(REPO, f"{name}.py")) & set(STAGES + TOOLS + ["tools"]), name
    for name in TOOLS:
        assert not imported_modules(os.path.join(REPO, "tools", f"{name}.py")) & set(STAGES + TOOLS + ["tools"]), name
    for path in glob.glob(os.path.join(REPO, "semples", "*.py")):  # the library imports no script either
        assert not imported_modules(path) & set(STAGES + TOOLS + ["tools"]), path


def flags_of(parser):
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("stage", STAGES)
def test_every_preset_value_names_a_flag_of_its_stage(stage):
    module = __import__(stage)
    flags = flags_of(module.build_parser())
    for dataset, values in presets.STAGES[stage].items():
        unknown = set(values) - set(flags)
        assert not unknown, f"semples/presets.py {stage} {dataset}: {unknown} are not flags of {stage}.py"


def test_stage_c_declares_stage_a_flags_as_stage_a_does():
    """train_match.py and train_refine.py each declare L_match's flags in their own file; they must agree, so that
    train_refine.py --lambda_refine 0 is stage (a) trained on."""
    a, c = flags_of(train_match.build_parser()), flags_of(train_refine.build_parser())
    assert set(a) <= set(c)
    for name, action in a.items():
        other = c[name]
        assert (action.default, action.type, action.choices, type(action)) == \
               (other.default, other.type, other.choices, type(other)), name
    for dataset in presets.DATASETS:  # and their presets
        pa, pc = presets.of("train_match")[dataset], presets.of("train_refine")[dataset]
        assert {k: v for k, v in pa.items() if k not in ("out", "init")} == \
               {k: v for k, v in pc.items() if k in pa and k not in ("out", "init")}, dataset


def test_seed_table_is_the_mean_and_std_over_seeds():
    """tools/seeds.py's table (the README's results): each cell is numpy's mean +- std (ddof 0) of the runs."""
    from tools import seeds
    keys = ("cam", "a", "c", "control")
    results = {f"w1_s{s}": {k: {"seed_miou": 50.0 + s + i, "pseudo_miou": 60.0 + 3 * s}
                            for i, k in enumerate(keys)} for s in (0, 2)}
    lines = seeds.table([1], [0, 2], results).splitlines()
    assert lines[2] == "world 1"
    row = {line[:34].strip(): line[35:] for line in lines[3:]}
    assert row["CAM network"].split() == ["51.00", "+-", "1.00", "(50.00", "52.00)", "63.00", "+-", "3.00",
                                          "(60.00", "66.00)"]
    assert row["SemPLeS - control"].split()[:3] == ["-1.00", "+-", "0.00"]  # c minus control, per seed
    assert row["SemPLeS - stage (a)"].split()[:3] == ["1.00", "+-", "0.00"]
    # --no-control and --seg: no control rows; the segmenter's row (without / with CRF)
    for r in results.values():
        del r["control"]
        r["seg"] = {"val_miou": 70.0, "val_miou_crf": 75.0}
    lines = seeds.table([1], [0, 2], results).splitlines()
    row = {line[:34].strip(): line[35:] for line in lines[3:]}
    assert "control (lambda 0)" not in row and "SemPLeS - control" not in row
    assert row["segmenter, val (no CRF / CRF)"].split()[:3] == ["70.00", "+-", "0.00"]
    assert row["segmenter, val (no CRF / CRF)"].split()[5:8] == ["75.00", "+-", "0.00"]
    # --generator make_toy2: its worlds' folders, named in the table; world 0 is not "the default world" there
    assert seeds.world_dir(0, "make_toy2").endswith(os.path.join("data", "toy2"))
    assert seeds.world_dir(3, "make_toy2").endswith(os.path.join("data", "toy2_w3"))
    assert seeds.world_dir(0).endswith(os.path.join("data", "toy"))
    lines = seeds.table([0], [0, 2], {k.replace("w1", "w0"): v for k, v in results.items()}, "make_toy2").splitlines()
    assert lines[0] == "worlds of tools/make_toy2.py" and lines[3] == "world 0"
    assert seeds.build_parser().parse_args(["--generator", "make_toy2"]).generator == "make_toy2"
