//! The Istio injection template in `injector-template/`, rendered for sample pods.
//!
//! Istio renders templates with Go's text/template, which cannot run here (no Go
//! toolchain). The template therefore uses one construct only, Istio's
//! `{{ annotation .ObjectMeta `KEY` DEFAULT }}`: the pod's annotation KEY if it has one
//! (even empty), else DEFAULT, printed; [`render`] implements exactly that, for the two
//! defaults the template names, and fails on any other action, so a template change that
//! this stand-in cannot render honestly fails the test instead of passing untested.
//!
//! For each sample pod, the rendered container must be valid in a Pod (kubernetes-validate,
//! strict), and meshinit must accept its args with the pod's annotations in a Downward API
//! file as the kubelet writes it, and plan exactly the ruleset it plans for the args
//! Istio's own template renders for that pod (pkg/kube/inject's istio-init, per the
//! injector's rules), which must also show the sample's point (8200 excluded, TPROXY's
//! mangle rules, nothing at all for mode NONE).

use std::path::{Path, PathBuf};

use crate::manifests::print_ruleset;
use crate::support::k8s::{
    containers, downward_api_annotations, list, require_kubernetes_validate, validate, VERSIONS,
};
use crate::support::scratch::ScratchDir;

/// Where the template mounts the pod's Downward API annotations file.
pub const MOUNTED_ANNOTATIONS: &str = "/etc/meshinit/pod/annotations";

fn template_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("injector-template")
}

/// What the template can see of a pod and of the mesh.
struct Context<'a> {
    annotations: &'a [(&'a str, &'a str)],
    /// `.ProxyConfig.InterceptionMode` (meshConfig.defaultConfig), as Go prints it.
    mesh_interception_mode: &'a str,
    /// `.Values.global.logging.level`.
    log_level: &'a str,
}

/// Renders the template for `ctx`. See the module's documentation for what it knows.
fn render(template: &str, ctx: &Context<'_>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let len = rest[start..]
            .find("}}")
            .unwrap_or_else(|| panic!("unclosed action in the template: {}", &rest[start..]));
        let action = &rest[start + 2..start + len];
        out.push_str(&evaluate(action, ctx));
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn evaluate(action: &str, ctx: &Context<'_>) -> String {
    let unknown = || -> ! {
        panic!(
            "the test's renderer knows only {{{{ annotation .ObjectMeta `KEY` DEFAULT }}}} \
             with DEFAULT .ProxyConfig.InterceptionMode or .Values.global.logging.level; \
             the template has {{{{{action}}}}}"
        )
    };
    let words: Vec<&str> = action.split_whitespace().collect();
    let ["annotation", ".ObjectMeta", key, default] = words.as_slice() else {
        unknown()
    };
    let Some(key) = key.strip_prefix('`').and_then(|k| k.strip_suffix('`')) else {
        unknown()
    };
    let default = match *default {
        ".ProxyConfig.InterceptionMode" => ctx.mesh_interception_mode,
        ".Values.global.logging.level" => ctx.log_level,
        _ => unknown(),
    };
    // Istio's getAnnotation: presence wins, even with an empty value.
    ctx.annotations
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(default, |(_, value)| value)
        .to_owned()
}

/// A sample pod: its annotations, the mesh's defaults, the args Istio's template renders
/// for istio-init (None: no istio-init at all), and what the ruleset must show.
struct Sample {
    name: &'static str,
    annotations: &'static [(&'static str, &'static str)],
    mesh_interception_mode: &'static str,
    istio_args: Option<&'static [&'static str]>,
    expect: &'static [&'static str],
}

/// Istio's istio-init args for a pod without traffic annotations, REDIRECT.
const ISTIO_DEFAULT: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--log_output_level=default:info",
];

/// Istio's istio-init args for a TPROXY pod (-u is then always 1337).
const ISTIO_TPROXY: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "TPROXY",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--log_output_level=default:info",
];

const SIDECAR_STATUS: &str = r#"{"initContainers":["istio-init","istio-proxy"],"containers":null,"volumes":["istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#;

const SAMPLES: &[Sample] = &[
    Sample {
        name: "plain",
        annotations: &[
            ("kubectl.kubernetes.io/default-container", "app"),
            ("sidecar.istio.io/status", SIDECAR_STATUS),
        ],
        mesh_interception_mode: "REDIRECT",
        istio_args: Some(ISTIO_DEFAULT),
        expect: &[
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        ],
    },
    Sample {
        name: "vault",
        annotations: &[
            ("kubectl.kubernetes.io/default-container", "app"),
            ("sidecar.istio.io/agentLogLevel", "default:debug"),
            ("sidecar.istio.io/status", SIDECAR_STATUS),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "198.51.100.30/32",
            ),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080,9090"),
        ],
        mesh_interception_mode: "REDIRECT",
        istio_args: Some(&[
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
            "-i",
            "*",
            "-x",
            "198.51.100.30/32",
            "-b",
            "8080,9090",
            "-d",
            "15090,15021,15020",
            "-o",
            "8200",
            "--log_output_level=default:debug",
        ]),
        expect: &[
            "-A ISTIO_OUTPUT -p tcp --dport 8200 -j RETURN",
            "-A ISTIO_OUTPUT -d 198.51.100.30/32 -j RETURN",
            "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT",
        ],
    },
    Sample {
        name: "tproxy-annotation",
        annotations: &[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("sidecar.istio.io/status", SIDECAR_STATUS),
        ],
        mesh_interception_mode: "REDIRECT",
        istio_args: Some(ISTIO_TPROXY),
        expect: &[
            "*mangle",
            "-j TPROXY --tproxy-mark",
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        ],
    },
    Sample {
        name: "tproxy-mesh-default",
        annotations: &[("sidecar.istio.io/status", SIDECAR_STATUS)],
        mesh_interception_mode: "TPROXY",
        istio_args: Some(ISTIO_TPROXY),
        expect: &["*mangle", "-j TPROXY --tproxy-mark"],
    },
    Sample {
        name: "interception-none",
        annotations: &[
            ("sidecar.istio.io/interceptionMode", "NONE"),
            ("sidecar.istio.io/status", SIDECAR_STATUS),
        ],
        mesh_interception_mode: "REDIRECT",
        istio_args: None,
        expect: &[],
    },
];

/// The init container's args (`istio-iptables …`) as the template renders them for a pod
/// with `annotations`, in a mesh whose default interception mode is `mesh_mode`.
pub fn rendered_init_args(annotations: &[(&str, &str)], mesh_mode: &str) -> Vec<String> {
    let template =
        std::fs::read_to_string(template_dir().join("meshinit.yaml")).expect("the template");
    let rendered = render(
        &template,
        &Context {
            annotations,
            mesh_interception_mode: mesh_mode,
            log_level: "default:info",
        },
    );
    let dir = ScratchDir::new("rendered");
    let file = dir.write("rendered.yaml", &rendered);
    let found = containers(&file);
    list(&found["-/initContainers/istio-init"], "args")
}

#[test]
fn injector_template_values_carry_the_template() {
    let test = "injector_template_values_carry_the_template";
    if !require_kubernetes_validate(test) {
        return;
    }
    let template = template_dir().join("meshinit.yaml");
    for (file, path) in [
        (
            "helm-values.yaml",
            "['sidecarInjectorWebhook']['templates']['meshinit']",
        ),
        (
            "istio-operator.yaml",
            "['spec']['values']['sidecarInjectorWebhook']['templates']['meshinit']",
        ),
    ] {
        let script = format!(
            "import sys, yaml\n\
             embedded = yaml.safe_load(open(sys.argv[1])){path}\n\
             sys.exit(0 if embedded == open(sys.argv[2]).read() else 1)"
        );
        let output = crate::support::run_bounded(
            std::process::Command::new("python3")
                .args(["-c", &script])
                .arg(template_dir().join(file))
                .arg(&template),
            std::time::Duration::from_secs(30),
        );
        assert!(
            output.status.success(),
            "{test}: {file} does not carry meshinit.yaml's text unchanged: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn injector_template_renders_for_sample_pods() {
    let test = "injector_template_renders_for_sample_pods";
    if !require_kubernetes_validate(test) {
        return;
    }
    let template =
        std::fs::read_to_string(template_dir().join("meshinit.yaml")).expect("the template");
    let dir = ScratchDir::new("template");
    for sample in SAMPLES {
        let what = format!("{test}: {}", sample.name);
        let rendered = render(
            &template,
            &Context {
                annotations: sample.annotations,
                mesh_interception_mode: sample.mesh_interception_mode,
                log_level: "default:info",
            },
        );

        // A valid container spec: in a Pod, with an app container beside it.
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n{rendered}  containers:\n  - name: app\n    image: registry.example/app:1.0\n",
            sample.name
        );
        let pod_file = dir.write(&format!("{}.yaml", sample.name), &pod);
        for version in VERSIONS {
            let output = validate(&pod_file, version);
            assert!(
                output.status.success(),
                "{what}: not a valid Pod for Kubernetes {version}:\n{}{}\n{pod}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let found = containers(&pod_file);
        let init = &found[&format!("{}/initContainers/istio-init", sample.name)];
        assert_eq!(
            init.get("volumeMounts.0.mountPath").map(String::as_str),
            Some(
                Path::new(MOUNTED_ANNOTATIONS)
                    .parent()
                    .unwrap()
                    .to_str()
                    .unwrap()
            ),
            "{what}"
        );

        // meshinit with those args, the annotations file where the volume puts it.
        let annotations = dir.write(
            &format!("{}.annotations", sample.name),
            &downward_api_annotations(sample.annotations),
        );
        let args: Vec<String> = list(init, "args")
            .into_iter()
            .map(|arg| {
                if arg == MOUNTED_ANNOTATIONS {
                    annotations.to_string_lossy().into_owned()
                } else {
                    arg
                }
            })
            .collect();
        assert_eq!(
            args.first().map(String::as_str),
            Some("istio-iptables"),
            "{what}"
        );
        let ours = print_ruleset(&what, &args[1..]);

        match sample.istio_args {
            Some(istio_args) => {
                let istio_args: Vec<String> = istio_args.iter().map(|a| a.to_string()).collect();
                let istios = print_ruleset(&what, &istio_args);
                assert_eq!(
                    ours, istios,
                    "{what}: the template's args {args:?} plan another ruleset than Istio's {istio_args:?}"
                );
                for needle in sample.expect {
                    assert!(ours.contains(needle), "{what}: no {needle:?} in\n{ours}");
                }
            }
            None => assert!(
                !ours.contains('*'),
                "{what}: expected no rules at all, got\n{ours}"
            ),
        }
    }
}

#[test]
fn renderer_refuses_what_it_does_not_know() {
    let ctx = Context {
        annotations: &[("a", "")],
        mesh_interception_mode: "REDIRECT",
        log_level: "default:info",
    };
    assert_eq!(
        render(
            "x{{ annotation .ObjectMeta `a` .ProxyConfig.InterceptionMode }}y",
            &ctx
        ),
        "xy",
        "an empty annotation still wins"
    );
    assert_eq!(
        render(
            "{{ annotation .ObjectMeta `b` .Values.global.logging.level }}",
            &ctx
        ),
        "default:info"
    );
    let refused = std::panic::catch_unwind(|| render("{{ .Values.global.hub }}", &ctx));
    assert!(refused.is_err());
}
