"""The template is the same in every method script: outside the docstring and the method's own regions (each runs
from a `# ALGO LOGIC` comment to the next `# TRY NOT TO MODIFY` comment), a script's lines are supervised.py's, in
the same order. So `diff supervised.py <method>.py` shows the method and nothing else."""

import ast
import difflib
import re

import pytest
from scriptrun import ROOT, TINY, rows, run
from scripts import SCRIPTS

METHOD_REGION, TEMPLATE_REGION = "# ALGO LOGIC", "# TRY NOT TO MODIFY"


def template_lines(text):
    """The lines outside the module docstring and the ALGO LOGIC regions, as (line number, text)."""
    lines = text.splitlines()
    doc_end = ast.parse(text).body[0].end_lineno  # the docstring is the method's
    kept, in_method = [], False
    for number, line in enumerate(lines[doc_end:], doc_end + 1):
        if line.strip().startswith(METHOD_REGION):
            in_method = True
        elif line.strip().startswith(TEMPLATE_REGION):
            in_method = False
        if not in_method:
            kept.append((number, line))
    return kept


def template_differences(text, template):
    """The template lines that `text` changed, dropped (-) or added (+); [] when it keeps them all."""
    ours, theirs = ([line for _, line in template_lines(t)] for t in (template, text))
    diff = difflib.unified_diff(ours, theirs, "supervised.py", "script", n=0, lineterm="")
    return [d for d in diff if d[:1] in "+-" and d[:3] not in ("---", "+++")]


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_template_lines_are_supervised_py_s(script):
    template, text = ((ROOT / s).read_text() for s in ("supervised.py", script))
    assert template_differences(text, template) == []


def test_a_changed_dropped_or_unmarked_line_is_caught():
    """The check itself: a method region may go before any template marker; a template line changed, dropped or added
    outside a region is caught, and so is a region closed by a marker of its own."""
    template = (ROOT / "supervised.py").read_text()
    marker = "        # TRY NOT TO MODIFY: EMA, metric sums"
    assert marker in template
    region = "        # ALGO LOGIC: a method's line\n        x = 1\n"
    assert template_differences(template.replace(marker, region + marker), template) == []
    line = next(line for line in template.splitlines(keepends=True) if "ema_weight.fill_(1 - min(" in line)
    old_rule = line.replace("10 + step", "1 + step")  # the EMA decay issue 11 replaced
    assert template_differences(template.replace(line, old_rule), template) == ["-" + line[:-1], "+" + old_rule[:-1]]
    assert template_differences(template.replace(line, ""), template) == ["-" + line[:-1]]
    assert template_differences(template.replace(line, line + "        x = 1\n"), template) == ["+        x = 1"]
    closed = template.replace(line, line + region + "        # TRY NOT TO MODIFY: mine\n")
    assert template_differences(closed, template) == ["+        # TRY NOT TO MODIFY: mine"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_method_helpers_come_first(script):
    """A method's own functions and classes sit in one place: after the imports, before the template's."""
    tree = ast.parse((ROOT / script).read_text())
    template = {n.name for n in ast.parse((ROOT / "supervised.py").read_text()).body if hasattr(n, "name")}
    defs = [(n.lineno, n.name in template) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    first_template = min(line for line, ours in defs if ours)
    assert all(line < first_template for line, ours in defs if not ours)


def test_every_script_is_listed():
    found = sorted(p.name for p in ROOT.glob("*.py") if p.name != "common.py")
    assert found == sorted(SCRIPTS)


def test_a_rows_accuracy_is_over_the_samples_it_counts(data_dir, tmp_path):
    """train/pseudo_acc in a row of 4 steps is the row's right pseudo labels over its kept ones (the template divides
    a key's row sum by its n/<key> sum), not the mean of the 4 steps' accuracies, which weighs a step that kept 11
    images as one that kept 55 and counts a step that kept none as 0 %. The per-step rows give the counts: a
    logged row changes nothing in the training, so both runs draw and train alike."""
    flags = [*TINY, "--data-dir", data_dir, "--total-steps", 4, "--threshold", 0.17]  # an untrained net: part kept
    run("fixmatch.py", *flags, "--log-every", 1, "--run-dir", tmp_path / "each")
    run("fixmatch.py", *flags, "--log-every", 4, "--run-dir", tmp_path / "row")
    steps = [r for r in rows(tmp_path / "each") if "train/mask_ratio" in r]
    kept = [round(r["train/mask_ratio"] * 8 * 7) for r in steps]  # of mu B = 56 (fake data: every label known)
    right = [r.get("train/pseudo_acc", 0) * k for r, k in zip(steps, kept)]
    assert len(steps) == 4 and len(set(kept)) > 1 and sum(kept) > 0, f"kept {kept}: pick a --threshold that splits"
    assert all(("train/pseudo_acc" in r) == (k > 0) for r, k in zip(steps, kept))  # none kept: no accuracy, not 0
    row = next(r for r in rows(tmp_path / "row") if "train/mask_ratio" in r)
    assert row["train/mask_ratio"] == pytest.approx(sum(kept) / (4 * 56), rel=1e-6)
    assert row["train/pseudo_acc"] == pytest.approx(sum(right) / sum(kept), rel=1e-5)


def test_the_console_shows_a_rows_values_to_four_significant_digits(data_dir, tmp_path):
    """Each train value on the console is its logged value to 4 significant digits (.4g), a value near 0 too: MPL's
    teacher lr in its warm-up, 1e-5 to 3e-5 here, which .4f printed as 0.0000 (the line's lr was .4g already)."""
    proc = run("mpl.py", *TINY, "--data-dir", data_dir, "--total-steps", 3, "--log-every", 1, "--run-dir", tmp_path)
    logged = [r for r in rows(tmp_path) if "train/lr" in r]
    printed = [line.split(" | ")[1].split() for line in proc.stdout.splitlines() if re.match(r"step +\d+/3 \|", line)]
    assert len(logged) == len(printed) == 3 and 0 < logged[0]["train/lr_teacher"] < 5e-5
    for row, words in zip(logged, printed, strict=True):
        shown = dict(zip(words[::2], map(float, words[1::2]), strict=True))
        assert shown == pytest.approx(
            {k.split("/")[1]: v for k, v in row.items() if k not in ("step", "train/lr")}, rel=5e-4
        )
