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
