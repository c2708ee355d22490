"""Adapts one of the repository's manifests (manifests/*.yaml) to the test node's images.

    python3 tests/k8s/adapt.py MANIFEST MESHINIT_IMAGE HELPER_IMAGE [CONTAINER=ROLE ...]

prints the manifest's documents with, in every pod template:
  - meshinit's image (any image named .../meshinit:TAG) replaced by MESHINIT_IMAGE, its
    arguments, securityContext and resources unchanged;
  - istio-proxy replaced by the stand-in sidecar (the integration tests' helper role
    `serve sidecar` on 15001, 15006 and 15021), its securityContext, resources and volume
    mounts unchanged, its HTTP probes on 15021 made TCP probes of the same port (the
    stand-in does not speak HTTP), and pilot-agent's preStop hook dropped;
  - each other container named in CONTAINER=ROLE replaced by the helper playing ROLE (e.g.
    `hello="serve app tcp:0.0.0.0:80"`), its securityContext, ports and mounts unchanged.
Every image is local (imagePullPolicy: Never). A container of another image not named in
CONTAINER=ROLE is an error: nothing else can run here.
"""

import sys

import yaml

HELPER_COMMAND = [
    "/mi-helper",
    "support::roles::helper_entrypoint",
    "--exact",
    "--nocapture",
    "--test-threads=1",
]
SIDECAR_ROLE = "serve sidecar tcp:0.0.0.0:15001 tcp:0.0.0.0:15006 tcp:0.0.0.0:15021"


def helper(container, image, role):
    container["image"] = image
    container["imagePullPolicy"] = "Never"
    container["command"] = list(HELPER_COMMAND)
    container.pop("args", None)
    container["env"] = [
        {"name": "MESHINIT_TEST_NO_PDEATHSIG", "value": "1"},
        {"name": "MESHINIT_TEST_ROLE", "value": role},
    ]


def tcp_probe(probe):
    http = probe.pop("httpGet", None)
    if http is not None:
        probe["tcpSocket"] = {"port": http["port"]}


def adapt_pod(spec, meshinit_image, helper_image, roles):
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        name, image = container["name"], container.get("image", "")
        if "/meshinit:" in image:
            container["image"] = meshinit_image
            container["imagePullPolicy"] = "Never"
        elif name == "istio-proxy":
            helper(container, helper_image, SIDECAR_ROLE)
            container.pop("lifecycle", None)
            for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
                if probe in container:
                    tcp_probe(container[probe])
        elif name in roles:
            helper(container, helper_image, roles[name])
        else:
            sys.exit(f"adapt.py: no role for container {name} ({image})")


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    path, meshinit_image, helper_image = sys.argv[1:4]
    roles = dict(arg.split("=", 1) for arg in sys.argv[4:])
    with open(path) as f:
        docs = [doc for doc in yaml.safe_load_all(f) if doc]
    for doc in docs:
        if doc["kind"] == "Pod":
            adapt_pod(doc["spec"], meshinit_image, helper_image, roles)
        elif "template" in doc.get("spec", {}):
            adapt_pod(doc["spec"]["template"]["spec"], meshinit_image, helper_image, roles)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


main()
