"""The README and the guides under docs/ point at things that exist: every relative link resolves to a file of
the repository, and every `python -m space ...` / `python -m datagen ...` command they show names a
subcommand that answers --help. BENCHMARKS.md's generated tables are what their results files give."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
COMMAND = re.compile(r"python -m (space|datagen) ([a-z0-9_-]+)")


def relative_links(doc: Path):
    for target in LINK.findall(doc.read_text()):
        if not re.match(r"[a-z]+://|#|mailto:", target):
            yield target.split("#")[0]


def test_the_docs_exist_and_the_readme_links_every_guide():
    guides = {p.name for p in (REPO / "docs").glob("*.md")}
    assert {"datasets.md", "training.md", "evaluation.md", "scale-out.md"} <= guides
    readme_links = set(relative_links(REPO / "README.md"))
    assert {f"docs/{g}" for g in guides} <= readme_links, "a guide in docs/ that the README does not link"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    broken = [t for t in relative_links(doc) if not (doc.parent / t).exists()]
    assert not broken, f"{doc.name} links to missing files: {broken}"


def shown_commands():
    found = set()
    for doc in DOCS:
        found |= set(COMMAND.findall(doc.read_text()))
    return sorted(found)


def test_the_docs_show_commands_of_both_packages():
    packages = {pkg for pkg, _ in shown_commands()}
    assert packages == {"space", "datagen"}


@pytest.mark.parametrize("package,command", shown_commands())
def test_every_command_shown_exists(package, command, capsys):
    if package == "space":
        from space.__main__ import main
    else:
        from datagen.__main__ import main
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0, f"`python -m {package} {command}` in the docs is not a command"
    assert "usage:" in capsys.readouterr().out


def test_benchmarks_generated_tables_are_what_their_results_files_give():
    docs = ["BENCHMARKS.md", "docs/tuning.md"]
    r = subprocess.run([sys.executable, "bench/tables.py", "--check", *docs], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for doc in docs:  # each file has tables, all current
        assert f"{doc}: " in r.stdout and f"{doc}: 0 generated" not in r.stdout, r.stdout
    assert r.stdout.count(" 0 out of date") == len(docs), r.stdout


def test_tables_rewrites_a_stale_table_and_refuses_other_commands(tmp_path):
    results = "bench/results/learning_demo_text.json"
    command = f"python bench/learning.py --out {results} --markdown --steps 800"
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n<!-- table: {command} -->\n| stale |\n<!-- end table -->\nafter\n")
    tables = [sys.executable, str(REPO / "bench" / "tables.py")]
    check = subprocess.run([*tables, "--check", str(doc)], capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and "out of date" in check.stderr
    assert "| stale |" in doc.read_text()  # --check writes nothing
    assert subprocess.run([*tables, str(doc)], capture_output=True, timeout=300).returncode == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- end table -->\nafter\n")
    points = [p for p in json.loads((REPO / results).read_text())["points"] if p["step"] == 800]
    ap50 = sum(p["ap50"] for p in points) / len(points)
    assert f"| text | 800 | {len(points)} | {ap50:.3f} (" in text  # the mean over seeds, from the file
    doc.write_text("<!-- table: rm -rf / -->\n<!-- end table -->\n")
    refused = subprocess.run([*tables, str(doc)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "must be `python bench/SCRIPT.py" in refused.stderr


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


@pytest.mark.parametrize("package", ["space", "datagen"])
def test_every_command_and_flag_has_help(package):
    """`--help` tells what every command and every flag is: none is listed bare."""
    if package == "space":
        from space.__main__ import build_parser
    else:
        from datagen.__main__ import build_parser
    parser = build_parser()
    listed = {a.dest for action in parser._actions if hasattr(action, "_choices_actions")
              for a in action._choices_actions if a.help}
    bare = []
    for name, sub in _subparsers(parser):
        if name not in listed:
            bare.append(name)
        bare += [f"{name} {a.option_strings or a.dest}" for a in sub._actions if not a.help and a.dest != "help"]
    assert not bare, f"without help: {bare}"


def test_space_config_prints_settings_that_train_reads_back(tmp_path, capsys):
    """The YAML of `python -m space config` is the resolved settings: given back as --config (over any
    preset) it resolves to the same Config."""
    import yaml

    from space.__main__ import main
    from space.config import resolve_config

    sets = ["model.grid_size=4", "model.tau={start: 2.5, end: 0.5, start_step: 0, end_step: 2000}"]
    assert main(["config", "--preset", "demo", *[f"--set={s}" for s in sets]]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed["model"]["grid_size"] == 4 and printed["train"]["batch_size"] == 4  # --set's, the demo's
    (tmp_path / "c.yaml").write_text(text)
    assert resolve_config("room3d_large", str(tmp_path / "c.yaml"), []) == resolve_config("demo", None, sets)
    assert main(["config", "--preset", "demo", "--set", "model.grid_size=3"]) == 2
    assert "grid_size" in capsys.readouterr().err
