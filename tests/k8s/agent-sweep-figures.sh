#!/usr/bin/env bash
# The node agent's capture sweep over a full node, measured on the real node (tests/k8s,
# scenario agent_capture_sweep: 110 pods on the node, all but the few already there
# meshed CNI-mode pods) and written into docs/cni-agent.md between its agent-sweep markers:
# one sweep's wall and CPU time (the agent's and the plugin runs') and the agent's memory.
#
#   bash tests/k8s/agent-sweep-figures.sh              # as root: runs the node through the
#                                                      # queue lock, then writes the figures
#   K8S_SCENARIOS="agent_capture agent_capture_sweep" bash tests/k8s/agent-sweep-figures.sh
#                                                      # other scenarios in the same run
#   bash tests/k8s/agent-sweep-figures.sh --from FILE  # figures a run already wrote
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = --from ]; then
  figures="$2"
else
  figures="$(mktemp /tmp/agent-sweep-figures.XXXXXX)"
  mkdir -p /run/meshinit-test
  flock /run/meshinit-test/k8s-queue.lock \
    env K8S_SCENARIOS="${K8S_SCENARIOS:-agent_capture_sweep}" AGENT_SWEEP_FIGURES="$figures" \
    bash tests/k8s/run.sh
fi
[ -s "$figures" ] || { echo "agent-sweep-figures.sh: no figures in $figures (did agent_capture_sweep run?)" >&2; exit 1; }
python3 - "$figures" docs/cni-agent.md <<'PY'
import datetime, os, re, sys
figures = dict(line.strip().split("=", 1) for line in open(sys.argv[1]) if "=" in line)
doc = open(sys.argv[2]).read()
date = datetime.date.today().isoformat()
cores = os.cpu_count()
# The machine's load when the sweep was measured (the scenario records it), else now.
load = figures.get("load") or open("/proc/loadavg").read().split()[0]
table = f"""<!-- agent-sweep:begin (written by tests/k8s/agent-sweep-figures.sh) -->
| measured {date}, {cores} cores shared (load average {load}) | |
| --- | --- |
| pods on the node | {figures['node_pods']} ({figures['meshed_pods']} meshed CNI-mode pods) |
| pods one sweep checked | {figures['swept_pods']} |
| one sweep's wall time | {float(figures['sweep_wall_s']):.1f} s |
| one sweep's CPU time (the agent and its plugin runs) | {float(figures['sweep_cpu_s']):.1f} s |
| the agent's memory (RSS, then peak) | {int(figures['agent_rss_kib']) // 1024} MiB, {int(figures['agent_peak_rss_kib']) // 1024} MiB |
<!-- agent-sweep:end -->"""
new, n = re.subn(r"<!-- agent-sweep:begin.*?<!-- agent-sweep:end -->", table, doc, flags=re.S)
if n != 1:
    sys.exit("docs/cni-agent.md has no agent-sweep markers")
open(sys.argv[2], "w").write(new)
print(table)
PY
