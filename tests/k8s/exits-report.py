#!/usr/bin/env python3
"""The capture step of each pod, from exits.py's records (bench.sh's second part).

    python3 exits-report.py EXITS.jsonl WHAT "T0:TEND T0:TEND ..."

WHAT names the step's first process, found in each window (a pod's creation to its
Ready) by its comm and its parent's:
  istio-init, meshinit-init   pilot-agent / meshinit whose parent is the containerd shim
                              (the init container); in CNI modes the same is istio-validation
  istio-cni, meshinit-cni     the plugin whose parent is containerd (its ADD); and the
                              validation init container, on a line of its own
  skip-istio-cni, skip-meshinit-cni   the plugin in other modes' windows: its start and
                              early return (an excluded namespace, or a pod not its own)
The step is that process (all its threads) and every process it started, transitively.
Prints one line per step: p50 over the windows of its CPU time (ms), the largest
high-water RSS among its processes (MiB), the processes it launched (itself included),
and, for a plugin, its wall time (fork to exit, ms). Fails when a window has none.
"""

import json
import statistics
import sys

SHIM = "containerd-shim"


def roots_of(what):
    """(comm, parent comm prefix) of the step's first process."""
    return {
        "istio-init": [("pilot-agent", SHIM)],
        "meshinit-init": [("meshinit", SHIM)],
        "istio-cni": [("istio-cni", "containerd")],
        "meshinit-cni": [("meshinit-cni", "containerd")],
        "skip-istio-cni": [("istio-cni", "containerd")],
        "skip-meshinit-cni": [("meshinit-cni", "containerd")],
        "istio-cni-validation": [("pilot-agent", SHIM)],
        "meshinit-cni-validation": [("meshinit", SHIM)],
    }[what]


def is_root(record, roots):
    for comm, parent in roots:
        if record["comm"] == comm and (
            record["pcomm"] == parent if parent == "containerd" else record["pcomm"].startswith(parent)
        ):
            return True
    return False


def step(records, roots):
    """The step in one window's records: (cpu_ms, rss_mib, processes, wall_ms) or None."""
    root = [r for r in records if is_root(r, roots)]
    if not root:
        return None
    parents = {r["pid"] for r in root}
    children = []
    grew = True
    while grew:
        grew = False
        for r in records:
            if r["ppid"] in parents and r["pid"] not in parents:
                parents.add(r["pid"])
                children.append(r)
                grew = True
    every = root + children
    return (
        sum(r["cpu_ns"] for r in every) / 1e6,
        max(r["rss_kb"] for r in every) / 1024,
        1 + len(children),
        max(r["etime_us"] for r in root) / 1000,
    )


def report(label, steps, windows, plugin):
    if not steps:
        print(f"  {label:24} none found in {windows} windows")
        return False
    cpu, rss, procs, wall = zip(*steps)
    line = (f"  {label:24} CPU {statistics.median(cpu):6.1f} ms   peak RSS {statistics.median(rss):5.1f} MiB"
            f" (max {max(rss):5.1f})   processes {statistics.median(procs):4.0f}")
    if plugin:
        line += f"   wall per ADD {statistics.median(wall):6.1f} ms"
    print(line + f"   ({len(steps)} of {windows} pods)")
    return len(steps) == windows


def main():
    path, what, spans = sys.argv[1], sys.argv[2], sys.argv[3].split()
    records = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "dropped" in r:
                print(f"  (exits.py missed records: the kernel's queue overflowed {r['dropped']} times)")
                continue
            records.append(r)
    windows = [tuple(float(x) for x in s.split(":")) for s in spans]

    def steps_for(kind):
        found = []
        for t0, tend in windows:
            s = step([r for r in records if t0 <= r["t"] <= tend], roots_of(kind))
            if s:
                found.append(s)
        return found

    plugin = what.endswith("-cni")
    ok = report(what, steps_for(what), len(windows), plugin)
    if what in ("istio-cni", "meshinit-cni"):
        report(f"{what} (validation)", steps_for(f"{what}-validation"), len(windows), False)
    sys.exit(0 if ok or what.startswith("skip-") else 1)


if __name__ == "__main__":
    main()
