"""Applies injector-template/meshinit.yaml to a pod, as Istio's injector would.

    python3 tests/k8s/template.py MESHINIT_IMAGE [ANNOTATION=VALUE ...] < pod.yaml

The pod on stdin (carrying istio-init and istio-proxy, as Istio's "sidecar" template leaves
it), with the annotations given added as a user writes them on a pod, gets the template's
istio-init merged onto its own by name (args,
resources, securityContext, volumeMounts replaced whole; image made MESHINIT_IMAGE, local)
and the template's volumes added. The template's expressions are Istio's `annotation`
lookups, evaluated the same way: the pod's annotation if set, else the default, which here
is the mesh's (interception mode REDIRECT, log level default:info). No istiod is involved:
what is tested is what the kubelet then runs, the Downward API file included.
"""

import os
import re
import sys

import yaml

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "injector-template", "meshinit.yaml")
DEFAULTS = {
    ".ProxyConfig.InterceptionMode": "REDIRECT",
    ".Values.global.logging.level": "default:info",
}
EXPRESSION = re.compile(r"\{\{ annotation \.ObjectMeta `([^`]+)` (\S+) \}\}")


def main():
    image = sys.argv[1]
    pod = yaml.safe_load(sys.stdin)
    annotations = pod["metadata"].setdefault("annotations", {})
    annotations.update(arg.split("=", 1) for arg in sys.argv[2:])
    with open(TEMPLATE) as f:
        text = f.read()

    def evaluate(match):
        key, default = match.group(1), match.group(2)
        if default not in DEFAULTS:
            sys.exit(f"template.py: no default known for {default}")
        return annotations.get(key, DEFAULTS[default])

    template = yaml.safe_load(EXPRESSION.sub(evaluate, text))["spec"]
    if "{{" in yaml.safe_dump(template):
        sys.exit("template.py: an expression is left unevaluated")
    spec = pod["spec"]
    for ours in template["initContainers"]:
        target = next(c for c in spec["initContainers"] if c["name"] == ours["name"])
        target.update(ours)
        target["image"] = image
        target["imagePullPolicy"] = "Never"
    spec.setdefault("volumes", []).extend(template["volumes"])
    yaml.safe_dump(pod, sys.stdout, sort_keys=False)


main()
