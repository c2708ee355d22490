//! The Istio injection template in `injector-template/`, rendered for sample pods by Istio's
//! real injector: `istio-inject-oracle` (interop/istio, `build.sh inject`) runs
//! pkg/kube/inject with the charts' templates and values, Go's text/template and Istio's
//! template functions, with the template installed by its IstioOperator overlay and opted
//! in by annotation, as a cluster would. The same pod is also injected with Istio's own
//! template, meshinit's image swapped in (`values.global.proxy_init.image`), which must
//! render exactly the args Istio's template is known to render for it.
//!
//! For each sample pod, the pod injected with meshinit's template must be a valid Pod
//! (kubernetes-validate, strict), and meshinit must accept its init container's args with
//! the injected pod's annotations in a Downward API file as the kubelet writes it, and plan
//! exactly the ruleset it plans for the args Istio's own template renders for that pod,
//! which must also show the sample's point (8200 excluded, TPROXY's mangle rules, nothing
//! at all for mode NONE). With Istio CNI, the init container is istio-validation, and
//! both templates give it `--run-validation --skip-rule-apply`.
//!
//! The oracle needs Go (`scripts/test.sh` provides it); without it these tests skip, and
//! fail under `CI=true` (`support::skip`).

use std::path::{Path, PathBuf};

use crate::istio_oracle::{
    built, injected, istio_init, pod_annotations, sample_pod, Env, InjectSample, MESHINIT_IMAGE,
};
use crate::manifests::print_ruleset;
use crate::support::k8s::{
    containers, downward_api_annotations, require_kubernetes_validate, validate, Fields, VERSIONS,
};
use crate::support::scratch::ScratchDir;

/// Where the template mounts the pod's Downward API annotations file.
pub const MOUNTED_ANNOTATIONS: &str = "/etc/meshinit/pod/annotations";

/// The annotation that opts a pod into meshinit's template.
const OPT_IN: (&str, &str) = ("inject.istio.io/templates", "sidecar,meshinit");

fn template_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("injector-template")
}

/// A sample pod: its annotations, istioctl `--set`s for the mesh, whether Istio CNI is on,
/// the args Istio's template renders for its init container (None: no init container at
/// all), and what the ruleset must show.
struct Sample {
    name: &'static str,
    annotations: &'static [(&'static str, &'static str)],
    set: &'static [&'static str],
    cni: bool,
    istio_args: Option<&'static [&'static str]>,
    expect: &'static [&'static str],
}

impl Sample {
    fn inject_sample(&self) -> InjectSample {
        InjectSample {
            name: self.name,
            annotations: self.annotations,
            set: self.set,
            native_sidecars: false,
            cni: self.cni,
            proxy_run_as_user: None,
            expect: self.expect,
        }
    }
}

/// Istio's istio-init args for a pod without traffic annotations, REDIRECT.
const ISTIO_DEFAULT: &[&str] = &[
    "istio-iptables",
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
    "istio-iptables",
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

const SAMPLES: &[Sample] = &[
    Sample {
        name: "plain",
        annotations: &[],
        set: &[],
        cni: false,
        istio_args: Some(ISTIO_DEFAULT),
        expect: &[
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        ],
    },
    Sample {
        name: "vault",
        annotations: &[
            ("sidecar.istio.io/agentLogLevel", "default:debug"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "198.51.100.30/32",
            ),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080,9090"),
        ],
        set: &[],
        cni: false,
        istio_args: Some(&[
            "istio-iptables",
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
        annotations: &[("sidecar.istio.io/interceptionMode", "TPROXY")],
        set: &[],
        cni: false,
        istio_args: Some(ISTIO_TPROXY),
        expect: &[
            "*mangle",
            "-j TPROXY --tproxy-mark",
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        ],
    },
    Sample {
        name: "tproxy-mesh-default",
        annotations: &[],
        set: &["meshConfig.defaultConfig.interceptionMode=TPROXY"],
        cni: false,
        istio_args: Some(ISTIO_TPROXY),
        expect: &["*mangle", "-j TPROXY --tproxy-mark"],
    },
    Sample {
        name: "interception-none",
        annotations: &[("sidecar.istio.io/interceptionMode", "NONE")],
        set: &[],
        cni: false,
        istio_args: None,
        expect: &[],
    },
    Sample {
        name: "istio-cni",
        annotations: &[("traffic.sidecar.istio.io/excludeOutboundPorts", "8200")],
        set: &[],
        cni: true,
        istio_args: Some(&[
            "istio-iptables",
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
            "-o",
            "8200",
            "--log_output_level=default:info",
            "--run-validation",
            "--skip-rule-apply",
        ]),
        expect: &[
            "-A ISTIO_OUTPUT -p tcp --dport 8200 -j RETURN",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ],
    },
];

/// The inject oracle and Istio's module directory, or None (skipped; fails under CI).
fn inject_oracle() -> Option<(PathBuf, PathBuf)> {
    built("inject")
}

/// `sample`'s pod injected by Istio's injector with meshinit's template (its IstioOperator
/// overlay, opted in by annotation), written into `dir`.
fn inject_with_template(
    oracle: &(PathBuf, PathBuf),
    sample: &InjectSample,
    dir: &ScratchDir,
) -> PathBuf {
    let operator = template_dir().join("istio-operator.yaml");
    let yaml = injected(
        &oracle.0,
        &oracle.1,
        sample,
        &sample_pod(sample, &[OPT_IN]),
        &[],
        std::slice::from_ref(&operator),
    );
    dir.write(&format!("{}-meshinit.yaml", sample.name), &yaml)
}

/// The init container's fields in the injected pod `file`.
fn init_fields(file: &Path, sample: &InjectSample) -> Option<Fields> {
    containers(file).remove(&format!(
        "{}/initContainers/{}",
        sample.name,
        sample.init_container()
    ))
}

/// The init container's args (`istio-iptables …`) as Istio's injector renders meshinit's
/// template for a pod with `annotations` in a mesh with the charts' defaults, and the
/// injected pod's annotations (what the kubelet writes into the Downward API file), as
/// pairs. None
/// when the inject oracle is unavailable (a skip outside CI, a failure under it).
pub fn rendered_init_args(
    annotations: &'static [(&'static str, &'static str)],
) -> Option<(Vec<String>, Env)> {
    let oracle = inject_oracle()?;
    let sample = InjectSample {
        name: "rendered",
        annotations,
        set: &[],
        native_sidecars: false,
        cni: false,
        proxy_run_as_user: None,
        expect: &[],
    };
    let dir = ScratchDir::new("rendered");
    let file = inject_with_template(&oracle, &sample, &dir);
    let (_, args, _) = istio_init(&file, sample.name, sample.init_container())
        .expect("meshinit's template renders istio-init");
    Some((args, pod_annotations(&file)))
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
    let Some(oracle) = inject_oracle() else {
        return;
    };
    let dir = ScratchDir::new("template");
    let swap = format!("values.global.proxy_init.image={MESHINIT_IMAGE}");
    for sample in SAMPLES {
        let what = format!("{test}: {}", sample.name);
        let inject = sample.inject_sample();
        let container = inject.init_container();

        // Istio's own template, meshinit's image swapped in: the args it is known to render.
        let by_istio = dir.write(
            &format!("{}-istio.yaml", sample.name),
            &injected(
                &oracle.0,
                &oracle.1,
                &inject,
                &sample_pod(&inject, &[]),
                &[&swap],
                &[],
            ),
        );
        let istio_args = istio_init(&by_istio, sample.name, container).map(|(image, args, _)| {
            assert_eq!(image, MESHINIT_IMAGE, "{what}: Istio's {container}'s image");
            args
        });
        assert_eq!(
            istio_args,
            sample
                .istio_args
                .map(|args| args.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            "{what}: the args Istio's template renders for {container}"
        );

        // meshinit's template: a valid Pod, in every Kubernetes version meshinit supports.
        let pod_file = inject_with_template(&oracle, &inject, &dir);
        let pod = std::fs::read_to_string(&pod_file).expect("the injected pod");
        for version in VERSIONS {
            let output = validate(&pod_file, version);
            assert!(
                output.status.success(),
                "{what}: not a valid Pod for Kubernetes {version}:\n{}{}\n{pod}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let init = init_fields(&pod_file, &inject)
            .unwrap_or_else(|| panic!("{what}: meshinit's template rendered no {container}"));
        assert_eq!(
            init.get("image").map(String::as_str),
            Some(MESHINIT_IMAGE),
            "{what}"
        );
        let mount_dir = Path::new(MOUNTED_ANNOTATIONS)
            .parent()
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            init.get("volumeMounts.0.mountPath").map(String::as_str),
            Some(mount_dir),
            "{what}: {container} does not mount {mount_dir}:\n{pod}"
        );

        // meshinit with those args, the injected pod's annotations file where the volume
        // puts it.
        let injected_annotations = pod_annotations(&pod_file);
        let annotations = dir.write(
            &format!("{}.annotations", sample.name),
            &downward_api_annotations(
                &injected_annotations
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect::<Vec<_>>(),
            ),
        );
        let args: Vec<String> = crate::support::k8s::list(&init, "args")
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
        // With Istio CNI, meshinit only validates, as Istio's istio-validation does.
        for flag in ["--run-validation", "--skip-rule-apply"] {
            assert_eq!(
                args.iter().any(|arg| arg == flag),
                sample.cni,
                "{what}: {flag} in {args:?}"
            );
        }
        let ours = print_ruleset(&what, &args[1..]);

        match istio_args {
            Some(istio_args) => {
                let istios = print_ruleset(&what, &istio_args[1..]);
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

/// With Istio CNI, the init container as either template renders it is meshinit validate.
/// Run as Istio runs istio-validation (the proxy's uid and gid, no capabilities) in a fresh
/// pod namespace, with exactly the rendered args (meshinit's with the injected pod's
/// annotations file): it programs nothing and fails with Istio's exit code, 126, while no
/// rules capture traffic; once the rules the CNI plugin programs for the pod are in place
/// (Istio's rendered config without the two flags), it passes.
#[test]
fn istio_cni_init_container_only_validates() {
    let test = "istio_cni_init_container_only_validates";
    if !crate::support::require_root(test) || !require_kubernetes_validate(test) {
        return;
    }
    let Some(oracle) = inject_oracle() else {
        return;
    };
    use crate::support::meshinit::{apply, command, dump_rules, run};
    let sample = SAMPLES
        .iter()
        .find(|sample| sample.cni)
        .expect("an Istio CNI sample")
        .inject_sample();
    let container = sample.init_container();
    let dir = ScratchDir::new("cni-validation");
    let swap = format!("values.global.proxy_init.image={MESHINIT_IMAGE}");
    let by_istio = dir.write(
        "istio.yaml",
        &injected(
            &oracle.0,
            &oracle.1,
            &sample,
            &sample_pod(&sample, &[]),
            &[&swap],
            &[],
        ),
    );
    let (_, istio_args, _) = istio_init(&by_istio, sample.name, container)
        .unwrap_or_else(|| panic!("{test}: Istio's template rendered no {container}"));
    let by_meshinit = inject_with_template(&oracle, &sample, &dir);
    let (_, meshinit_args, _) = istio_init(&by_meshinit, sample.name, container)
        .unwrap_or_else(|| panic!("{test}: meshinit's template rendered no {container}"));
    let annotations = dir.write(
        "annotations",
        &downward_api_annotations(
            &pod_annotations(&by_meshinit)
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
        ),
    );
    let meshinit_args: Vec<String> = meshinit_args
        .into_iter()
        .map(|arg| {
            if arg == MOUNTED_ANNOTATIONS {
                annotations.to_string_lossy().into_owned()
            } else {
                arg
            }
        })
        .collect();
    let plugin_rules: Vec<&str> = istio_args[1..]
        .iter()
        .map(String::as_str)
        .filter(|arg| !matches!(*arg, "--run-validation" | "--skip-rule-apply"))
        .collect();
    for (template, args) in [
        ("Istio's template", &istio_args),
        ("meshinit's template", &meshinit_args),
    ] {
        let what = format!("{test}: {template}");
        let ns = crate::support::netns::NetNs::new("cnival");
        ns.run(&["ip", "link", "set", "lo", "up"]);
        // A pod's IPv4 address (documentation range): meshinit reads the family off it.
        ns.run(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ns.run(&["ip", "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
        ns.run(&["ip", "link", "set", "eth0", "up"]);
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.push("--probe-timeout=1s");
        let ran = run(command(&ns, crate::validate::AS_PROXY, &args));
        assert_eq!(ran.code, Some(126), "{what}: without rules: {ran:?}");
        let left = dump_rules(&ns);
        assert!(
            !left.contains("ISTIO"),
            "{what}: the validation container programmed rules:\n{left}"
        );
        apply(&ns, &plugin_rules, &[]);
        let ran = run(command(&ns, crate::validate::AS_PROXY, &args));
        assert_eq!(
            ran.code,
            Some(0),
            "{what}: with the plugin's rules: {ran:?}"
        );
    }
}
