"""What the benchmark scripts share: a description of the machine they ran on."""

from __future__ import annotations

import os
import platform


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "loadavg_1m": os.getloadavg()[0]}


def emit(results: dict, table: str, out: str | None = None, markdown: bool = False) -> None:
    """A benchmark's ending: the results written to `out` (JSON) when given, the table printed, then the
    results as one JSON line unless `markdown` (the table alone, as bench/tables.py reads it)."""
    import json
    from pathlib import Path

    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    print(table)
    if not markdown:
        print(json.dumps(results))


def add_from_flags(parser, many: bool = False) -> None:
    """--from and --markdown: print a results file's table instead of measuring (as bench/tables.py runs);
    with `many`, --from takes several files (read with load_runs)."""
    parser.add_argument("--from", dest="source", metavar="JSON", nargs="+" if many else None,
                        help="measure nothing: print the table of results files" if many else
                        "measure nothing: print the table of a results file")
    parser.add_argument("--markdown", action="store_true", help="with --from: the table alone (bench/tables.py)")


def print_from(ns, table) -> bool:
    """With --from, print the table `table(results)` of that file and say so (True): nothing to measure."""
    import json
    from pathlib import Path

    if not ns.source:
        return False
    results = json.loads(Path(ns.source).read_text())
    emit(results, table(results), markdown=ns.markdown)
    return True


def load_runs(paths) -> list[dict]:
    """The runs in these results files: each a run's JSON object, or an object whose "runs" lists them."""
    import json

    runs = []
    for path in paths:
        with open(path) as fh:
            d = json.load(fh)
        runs += d["runs"] if "runs" in d else [d]
    return runs
