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


def commit(repo, short: bool = False) -> str:
    """The git commit checked out in `repo` (a checkout's folder), or "" outside a git checkout."""
    import subprocess

    flags = ["--short"] if short else []
    return subprocess.run(["git", "rev-parse", *flags, "HEAD"], cwd=repo, capture_output=True,
                          text=True).stdout.strip()


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


def add_detection_flags(parser) -> None:
    """The flags of a benchmark that reads `space evaluate`'s detections.json files against a 3D-Room store."""
    parser.add_argument("--data", help="the 3D-Room store the detections are of")
    parser.add_argument("--split", default="val", help="its split (default: val)")
    parser.add_argument("--detections", nargs="+", help="detections.json files of `space evaluate`")
    parser.add_argument("--labels", nargs="+", help="a row name per detections file (default: the paths)")
    parser.add_argument("--threshold", type=float, default=0.5, help="z_pres probability of a detection (default 0.5)")
    parser.add_argument("--iou", type=float, default=0.5, help="least IoU of a box that finds an object (default 0.5)")
    parser.add_argument("--out", help="also write the results here (JSON)")
    parser.add_argument("--from", dest="source", metavar="JSON", help="print the table of a results file instead")
    parser.add_argument("--markdown", action="store_true", help="print the table alone (bench/tables.py)")


def score_detections(parser, ns, score) -> tuple:
    """The store of --data and the rows {label: score(store, detections)} of each --detections file; a
    parser error when they are missing, when the labels do not match them, or when the store has no masks."""
    import json
    from pathlib import Path

    from datagen.store import Store

    if not (ns.data and ns.detections):
        parser.error("give --data and --detections (or --from a results file)")
    if ns.labels and len(ns.labels) != len(ns.detections):
        parser.error(f"{len(ns.labels)} labels for {len(ns.detections)} detections files")
    store = Store(ns.data)
    try:
        store.array(ns.split, "masks")
    except Exception:  # noqa: BLE001 - the store reader names a missing array in its own way
        raise SystemExit(f"error: {ns.data} has no instance masks in {ns.split!r}; this reads 3D-Room stores") from None
    rows = {label: score(store, json.loads(Path(path).read_text()))
            for label, path in zip(ns.labels or ns.detections, ns.detections)}
    return store, rows
