"""dvc.yaml's code stage: a fingerprint blind to comments and docstrings, over every module a stage needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from datagen.__main__ import main as datagen_main
from datagen.fingerprint import source_fingerprint

REPO = Path(__file__).resolve().parents[1]

MODULE = '''"""A module."""

SCALE = 2  # why two


def f(x):
    """Twice x."""
    return SCALE * x
'''


def _fp(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return source_fingerprint([p])


def test_comments_docstrings_and_layout_do_not_change_it_code_does(tmp_path):
    base = _fp(tmp_path, "m.py", MODULE)
    cosmetic = MODULE.replace('"""Twice x."""', '"""Two times x, documented at length."""') \
        .replace("# why two", "# a comment") .replace('"""A module."""', '"""Another module docstring."""') + "\n\n"
    assert _fp(tmp_path, "m.py", cosmetic) == base
    assert _fp(tmp_path, "m.py", MODULE.replace("SCALE = 2", "SCALE = 3")) != base
    assert _fp(tmp_path, "m.py", MODULE.replace("return SCALE * x", "return x * SCALE")) != base
    # A function whose whole body is its docstring is still code: removing the function changes the hash.
    assert _fp(tmp_path, "m.py", MODULE + 'def g():\n    """only a docstring"""\n') != base


def test_the_order_of_files_does_not_matter_and_bad_files_are_named(tmp_path, capsys):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("A = 1\n")
    b.write_text("B = 2\n")
    assert source_fingerprint([a, b]) == source_fingerprint([b, a])
    out = tmp_path / "fp" / "x.txt"
    assert datagen_main(["fingerprint", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_text() == source_fingerprint([a, b]) + "\n"
    (tmp_path / "c.py").write_text("def (:\n")
    assert datagen_main(["fingerprint", str(tmp_path / "c.py")]) == 2
    assert datagen_main(["fingerprint", str(tmp_path / "none.py")]) == 2
    err = capsys.readouterr().err
    assert "c.py is not valid Python" in err and "cannot read" in err and "none.py" in err


def _fingerprinted_files() -> dict:
    """{'results/code/train.txt': {files}, ...} from dvc.yaml's code stage."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["code"]["cmd"]
    out = {}
    for part in cmd.split("&&"):
        words = part.split()
        target = words[words.index("--out") + 1]
        out[target] = {w for w in words if w.endswith(".py")}
    return out


def _imported_modules(code: str) -> set:
    """The project's source files that `code` imports, in a fresh interpreter."""
    probe = (f"import sys; {code}; print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
             "if n.split('.')[0] in ('space', 'datagen') and getattr(m, '__file__', None)))")
    files = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    return {str(Path(f).resolve().relative_to(REPO)) for f in files if not f.endswith("__init__.py")}


def test_each_fingerprint_covers_every_module_its_stage_imports():
    """A module the training or scoring code imports but the fingerprint leaves out would change results
    without DVC noticing; the check runs the imports themselves, so it follows the code."""
    fp = _fingerprinted_files()
    assert set(fp) == {"results/code/datagen.txt", "results/code/train.txt", "results/code/evaluate.txt"}
    needs = {
        # validation in training (best.pt) uses evaluate's detections and metrics' AP, imported lazily
        "results/code/train.txt": "import space.__main__, space.train, space.evaluate, space.metrics",
        # scoring also reads the latents for the z_what probe (space.encode, space.probe, imported lazily)
        "results/code/evaluate.txt": "import space.__main__, space.evaluate, space.encode, space.probe, space.viz, "
                                     "space.curves, space.select, datagen.coco",
        "results/code/datagen.txt": "import datagen.__main__, datagen.room3d, datagen.atari, datagen.show",
    }
    for target, code in needs.items():
        missing = _imported_modules(code) - fp[target]
        assert not missing, f"{target} leaves out {sorted(missing)}"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "results/code/train.txt" in stages["train"]["do"]["deps"]
    assert "results/code/evaluate.txt" in stages["evaluate"]["do"]["deps"]
    assert "results/code/datagen.txt" in stages["data"]["do"]["deps"]
    assert not {"space", "datagen"} & {*stages["train"]["do"]["deps"], *stages["data"]["do"]["deps"]}
