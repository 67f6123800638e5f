"""BENCHMARKS.md's tables, generated from the results files in bench/results/ by the commands that read them.

A generated table sits between two comments that name the command printing it:

    <!-- table: python bench/learning.py --out bench/results/learning_demo_anneal_3000.json --markdown -->
    | ... the command's output ... |
    <!-- end table -->

`python bench/tables.py BENCHMARKS.md` runs each block's command from the repository root and writes its
output in place; `--check` changes nothing and exits 1, naming each block whose table is not what its
results file gives now. Commands must be `python bench/SCRIPT.py ...` reading results files (they are
run, so nothing else is accepted).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (?P<cmd>.+?) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def render(command: str) -> str:
    """The table a block's command prints now."""
    argv = shlex.split(command)
    if len(argv) < 2 or argv[0] != "python" or not re.fullmatch(r"bench/[a-z0-9_]+\.py", argv[1]):
        raise SystemExit(f"error: a table's command must be `python bench/SCRIPT.py ...`, got {command!r}")
    r = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: `{command}` failed ({r.returncode}):\n{r.stderr.strip()}")
    return r.stdout.strip() + "\n"


def regenerate(text: str) -> tuple[str, list[str]]:
    """The Markdown with every block's table rendered anew, and the commands whose table changed."""
    stale = []

    def fill(m: re.Match) -> str:
        body = render(m["cmd"])
        if body != m["body"]:
            stale.append(m["cmd"])
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("markdown", nargs="+", help="Markdown files with generated tables, e.g. BENCHMARKS.md")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table is out of date")
    ns = p.parse_args(argv)
    failed = False
    for path in map(Path, ns.markdown):
        text = path.read_text()
        new, stale = regenerate(text)
        blocks = len(BLOCK.findall(text))
        for cmd in stale:
            print(f"{path}: {'out of date' if ns.check else 'rewrote'}: {cmd}", file=sys.stderr)
        if ns.check:
            failed |= bool(stale)
        elif new != text:
            path.write_text(new)
        print(f"{path}: {blocks} generated tables, {len(stale)} {'out of date' if ns.check else 'rewritten'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
