//! meshinit's real image, built from the repository's Dockerfile, run in podman pods the way
//! a kubelet runs a pod: init containers to completion first, then the others, all in one
//! network namespace (a throwaway one of the tests', see `topology`).
//!
//! The image is built once per test run (every test that needs it waits for that one
//! build) by `tests/podman/build-offline.sh`, the documented offline build, into a podman
//! storage of the tests' own, so that nothing of the machine's own podman is touched:
//! [`STORAGE`], kept between runs as a cache (the base image takes a minute to make), with
//! its run state in [`RUN_STATE`]. Pods, containers and cgroups a test makes are removed by
//! guards, also when it fails.
//!
//! podman 4.3 cannot give a pod's infra container an existing namespace (`--network
//! ns:PATH` is refused for pods), so the pods here have no infra container and each
//! container joins the test's namespace itself: what the pod's containers share is the
//! same, a network namespace that only the test's documentation addresses reach.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::netns::NetNs;
use super::procs::{client_outcome, Outcome, Proto};
use super::roles::{ENTRYPOINT, READY, ROLE_ENV};
use super::{require_root, run_bounded};

/// The tests' podman storage (images, containers), kept between runs.
pub const STORAGE: &str = "/var/lib/meshinit-test/podman";
/// The tests' podman run state (on tmpfs, so a reboot clears it, as podman expects).
pub const RUN_STATE: &str = "/run/meshinit-test/podman";
/// The tag the tests build the Dockerfile under.
pub const IMAGE: &str = "localhost/meshinit:test";
/// The tag the tests build the Dockerfile's `nftables-only` target under.
pub const NFTABLES_ONLY_IMAGE: &str = "localhost/meshinit:test-nftables-only";
/// The tag the tests build the default image for the other arch under (`-arm64` on an
/// amd64 machine, `-amd64` on an arm64 one).
pub const OTHER_ARCH_IMAGE_PREFIX: &str = "localhost/meshinit:test-";

/// Bound on the offline build: a cold one makes the base image and compiles meshinit.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// Bound on any other podman command (a pod start runs the init container to completion).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a helper container may take to report its listeners bound.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Where helper containers see the test binary.
pub const HELPER_PATH: &str = "/mi-helper";

/// Programs the image tests need besides those of [`require_root`].
const REQUIRED_PROGRAMS: [&str; 4] = ["podman", "runc", "mmdebstrap", "cargo"];

/// Whether the image tests can run here: root, and podman with runc and mmdebstrap. Skips
/// with a reason otherwise, and fails under `CI=true`, like [`require_root`].
pub fn require_podman(test_name: &str) -> bool {
    if !require_root(test_name) {
        return false;
    }
    let Some(missing) = REQUIRED_PROGRAMS
        .iter()
        .find(|program| which::which(program).is_err())
    else {
        return true;
    };
    let reason = format!("needs `{missing}` on PATH (scripts/test.sh installs it as root)");
    super::skip(test_name, &reason);
    false
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The global options that select the tests' storage, in the order podman wants them.
pub fn global_options() -> Vec<String> {
    vec![
        "--root".to_owned(),
        STORAGE.to_owned(),
        "--runroot".to_owned(),
        format!("{RUN_STATE}/storage"),
        "--tmpdir".to_owned(),
        format!("{RUN_STATE}/libpod"),
    ]
}

/// `podman <storage options> ARGS`, with the repository's containers.conf.
pub fn podman(args: &[&str]) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(global_options()).args(args).env(
        "CONTAINERS_CONF",
        repo_root().join("tests/podman/containers.conf"),
    );
    cmd
}

/// Runs a podman command, bounded; returns what it did, success or not.
pub fn run(args: &[&str]) -> Output {
    run_bounded(&mut podman(args), COMMAND_TIMEOUT)
}

/// Runs a podman command; panics with its output unless it succeeds. Returns stdout.
pub fn expect(args: &[&str]) -> String {
    super::expect_success(&format!("podman {args:?}"), run(args))
}

/// The images the tests use.
#[derive(Debug)]
pub struct Images {
    /// meshinit's image, built from the repository's Dockerfile.
    pub meshinit: String,
    /// The Debian base the build used; the helper containers run on it.
    pub base: String,
}

/// Builds the Dockerfile offline, once per test run; every caller gets the same result.
/// Panics (in each caller) with the build's output if it failed.
pub fn images() -> &'static Images {
    static BUILT: OnceLock<Result<Images, String>> = OnceLock::new();
    built_once(&BUILT, None, None, IMAGE)
}

/// The Debian arch of this machine (and of [`images`]'s image).
pub fn host_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    }
}

/// The Debian arch the image is also built for: the one this machine is not.
pub fn other_arch() -> &'static str {
    if host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
}

/// The default image built offline for [`other_arch`] (`build-offline.sh --arch`), once
/// per test run, after [`images`] (whose crates and base it reuses). Panics like [`images`].
pub fn other_arch_image() -> &'static str {
    static BUILT: OnceLock<Result<Images, String>> = OnceLock::new();
    images();
    let tag = format!("{OTHER_ARCH_IMAGE_PREFIX}{}", other_arch());
    &built_once(&BUILT, None, Some(other_arch()), &tag).meshinit
}

/// Builds the Dockerfile's `nftables-only` target offline, once per test run, as
/// [`NFTABLES_ONLY_IMAGE`], and returns that tag. The default image is built first, so
/// that the target's `build` stage, the compiled binary, comes from podman's layer cache
/// (unless the sources changed in between): Rust compiles once. Panics like [`images`].
pub fn nftables_only_image() -> &'static str {
    static BUILT: OnceLock<Result<Images, String>> = OnceLock::new();
    images();
    &built_once(&BUILT, Some("nftables-only"), None, NFTABLES_ONLY_IMAGE).meshinit
}

/// The result in `cell`, made by the first caller with [`build`]; panics with the build's
/// report if it failed.
fn built_once(
    cell: &'static OnceLock<Result<Images, String>>,
    target: Option<&str>,
    arch: Option<&str>,
    tag: &str,
) -> &'static Images {
    match cell.get_or_init(|| build(target, arch, tag)) {
        Ok(images) => images,
        Err(report) => panic!("building {tag} failed:\n{report}"),
    }
}

/// `build-offline.sh [--target TARGET] [--arch ARCH] TAG`, into the tests' storage.
fn build(target: Option<&str>, arch: Option<&str>, tag: &str) -> Result<Images, String> {
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tests/podman/build-offline.sh"));
    if let Some(target) = target {
        cmd.args(["--target", target]);
    }
    if let Some(arch) = arch {
        cmd.args(["--arch", arch]);
    }
    cmd.arg(tag)
        .env("PODMAN_OPTS", global_options().join(" "))
        .env(
            "CONTAINERS_CONF",
            repo_root().join("tests/podman/containers.conf"),
        );
    let output = run_bounded(&mut cmd, BUILD_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        ));
    }
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_owned)
            .ok_or_else(|| format!("build-offline.sh printed no `{name}` line:\n{stdout}"))
    };
    let images = Images {
        meshinit: field("image")?,
        base: field("base")?,
    };
    // Earlier builds' images, untagged since: kept for a day as layer cache, then removed.
    let _ = run(&["image", "prune", "--force", "--filter", "until=24h"]);
    eprintln!(
        "built {} offline (base {}) in {:.0?}",
        images.meshinit,
        images.base,
        started.elapsed()
    );
    Ok(images)
}

/// Removes a manifest list (an image index) on drop, also when a test panics.
pub struct RemoveImage(pub String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = run(&["manifest", "rm", &self.0]);
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A pod or container name no other test in this run has, whichever support module
/// makes it: all of them share one podman storage.
pub fn fresh_name(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("mi-{}-{n}-{role}", std::process::id())
}

/// A podman pod whose containers all join `netns`; removed with all its containers on
/// drop (also when a test panics).
#[derive(Debug)]
pub struct Pod {
    name: String,
    network: String,
}

impl Pod {
    pub fn new(role: &str, netns: &NetNs) -> Pod {
        let pod = Pod {
            name: fresh_name(role),
            network: format!("ns:/var/run/netns/{}", netns.name()),
        };
        expect(&["pod", "create", "--infra=false", "--name", &pod.name]);
        pod
    }
}

impl PodContainers for Pod {
    fn podman_run(&self, args: &[&str]) -> Output {
        run(args)
    }

    fn pod_name(&self) -> &str {
        &self.name
    }

    /// Every container joins the test's namespace itself: podman 4.3's pods cannot.
    fn container_options(&self) -> Vec<&str> {
        vec!["--network", &self.network]
    }
}

/// Checks a pod that must not come up: starting it failed, its init container `init`
/// exited with `code` and said each of `needles`, and none of `after` ever started.
/// `what` names the case in failure messages.
pub fn assert_blocked_by_init(
    what: &str,
    pod: &impl PodContainers,
    started: &Output,
    init: &str,
    code: i64,
    needles: &[&str],
    after: &[&str],
) {
    let logs = pod.logs(init);
    assert!(
        !started.status.success(),
        "{what}: the pod started:\n{logs}"
    );
    let state = pod.state(init);
    assert_eq!(state.exit_code, code, "{what}: {state:?}\n{logs}");
    for needle in needles {
        assert!(
            logs.contains(needle),
            "{what}: expected {init}'s message to mention {needle}:\n{logs}"
        );
    }
    for role in after {
        let state = pod.state(role);
        assert!(
            !state.ever_started,
            "{what}: {role} started after {init} failed: {state:?}"
        );
    }
}

/// What every test pod does with its containers. Pods differ only in where their podman
/// runs and in the options each container is created with.
pub trait PodContainers {
    /// Runs `podman ARGS` where this pod's podman runs, bounded.
    fn podman_run(&self, args: &[&str]) -> Output;
    fn pod_name(&self) -> &str;
    /// Options every container of this pod is created with.
    fn container_options(&self) -> Vec<&str>;

    /// `podman ARGS`; panics with its output unless it succeeds. Returns stdout.
    fn podman_expect(&self, args: &[&str]) -> String {
        super::expect_success(&format!("podman {args:?}"), self.podman_run(args))
    }

    /// The name of this pod's container `role`.
    fn container_name(&self, role: &str) -> String {
        format!("{}-{role}", self.pod_name())
    }

    /// `podman create --pod POD --name POD-ROLE <pod's options> OPTIONS IMAGE ARGS`.
    fn create(&self, role: &str, options: &[&str], image: &str, args: &[&str]) {
        let name = self.container_name(role);
        let mut argv = vec!["create", "--pod", self.pod_name(), "--name", &name];
        argv.extend(self.container_options());
        argv.extend_from_slice(options);
        argv.push(image);
        argv.extend_from_slice(args);
        self.podman_expect(&argv);
    }

    /// Creates a container running a helper role (see `roles`) from the test binary,
    /// bind-mounted read-only into `image`, with `options` (user, capabilities).
    fn create_helper(&self, role: &str, options: &[&str], image: &str, spec: &str) {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mount = format!("{}:{HELPER_PATH}:ro", exe.display());
        let env = format!("{ROLE_ENV}={spec}");
        let mut all = vec!["--volume", &mount, "--env", &env];
        all.extend_from_slice(options);
        self.create(role, &all, image, &helper_argv());
    }

    /// `podman pod start`: the infra container if any (CNI ADD), init containers to
    /// completion, in order, then the others.
    fn start(&self) -> Output {
        self.podman_run(&["pod", "start", self.pod_name()])
    }

    /// `podman inspect --format FORMAT` of container `role`, trimmed.
    fn inspect(&self, role: &str, format: &str) -> String {
        let name = self.container_name(role);
        self.podman_expect(&["inspect", "--format", format, &name])
            .trim()
            .to_owned()
    }

    /// A container's state: (status, exit code, started at).
    fn state(&self, role: &str) -> ContainerState {
        let out = self.inspect(
            role,
            "{{.State.Status}}|{{.State.ExitCode}}|{{.State.StartedAt.IsZero}}",
        );
        let fields: Vec<&str> = out.split('|').collect();
        match fields.as_slice() {
            [status, code, never] => ContainerState {
                status: (*status).to_owned(),
                exit_code: code.parse().unwrap_or(-1),
                ever_started: *never != "true",
            },
            _ => panic!(
                "unexpected podman inspect output for {}: {out:?}",
                self.container_name(role)
            ),
        }
    }

    /// A container's output so far (stdout and stderr, as podman keeps them).
    fn logs(&self, role: &str) -> String {
        let output = self.podman_run(&["logs", &self.container_name(role)]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Waits until helper container `role` reports its listeners bound; panics with its
    /// logs if it does not within a bound.
    fn wait_ready(&self, role: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let logs = self.logs(role);
            if logs.lines().any(|line| line == READY) {
                return;
            }
            let state = self.state(role);
            if state.status != "running" || Instant::now() >= deadline {
                panic!(
                    "container {} did not get ready ({state:?}):\n{logs}",
                    self.container_name(role)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a helper `client` role inside running container `role` as `user` (`uid:gid`),
    /// with `podman exec`, and reports who answered.
    fn connect(&self, role: &str, user: &str, proto: Proto, target: &str) -> Outcome {
        let env = format!("{ROLE_ENV}=client {} {target}", proto.as_str());
        let name = self.container_name(role);
        // The helper kills itself when its parent dies; `runc exec`, its parent here, may
        // exit first. A shell that waits for it (no `exec`: it still has `exit` to run)
        // stays its parent to the end.
        let script = format!("{HELPER_PATH} \"$@\"; exit $?");
        let mut argv = vec!["exec", "--user", user, "--env", &env, &name];
        argv.extend(["/bin/sh", "-c", &script]);
        argv.extend(helper_argv());
        client_outcome(&self.podman_run(&argv))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let output = run(&["pod", "rm", "--force", "--time", "0", &self.name]);
        if !output.status.success() {
            // Never panic here: it may run while a failed test unwinds.
            eprintln!(
                "warning: could not remove pod {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// What `podman inspect` says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub status: String,
    pub exit_code: i64,
    pub ever_started: bool,
}

/// The helper's argv inside a container (the role comes from the environment).
pub fn helper_argv() -> [&'static str; 5] {
    [
        HELPER_PATH,
        ENTRYPOINT,
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]
}

/// A cgroup for one container to run under (`--cgroup-parent`), so that its memory peak
/// outlives it: podman removes a container's own cgroup when it exits, but not the parent,
/// whose peak covers its children. Removed on drop, in every hierarchy it was made in.
#[derive(Debug)]
pub struct CgroupParent {
    name: String,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl CgroupParent {
    pub fn new(role: &str) -> CgroupParent {
        CgroupParent {
            name: fresh_name(role),
        }
    }

    /// The `--cgroup-parent` value.
    pub fn path(&self) -> String {
        format!("/{}", self.name)
    }

    /// The highest memory use of everything that ran under this cgroup, in bytes: cgroup
    /// v1's `memory.max_usage_in_bytes`, or v2's `memory.peak`. Both count page cache the
    /// cgroup was first to read, besides the processes' own memory.
    pub fn peak_memory(&self) -> u64 {
        let candidates = [
            Path::new(CGROUP_ROOT)
                .join("memory")
                .join(&self.name)
                .join("memory.max_usage_in_bytes"),
            Path::new(CGROUP_ROOT).join(&self.name).join("memory.peak"),
        ];
        candidates
            .iter()
            .find_map(|file| std::fs::read_to_string(file).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or_else(|| panic!("no memory peak for cgroup {} ({candidates:?})", self.name))
    }

    /// Every directory this cgroup has: one per v1 hierarchy, or the v2 one.
    fn directories(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(CGROUP_ROOT)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.path().join(&self.name))
                    .collect()
            })
            .unwrap_or_default();
        dirs.push(Path::new(CGROUP_ROOT).join(&self.name));
        dirs.into_iter().filter(|dir| dir.is_dir()).collect()
    }
}

/// Removes a cgroup directory: its child cgroups first (a cgroup's files go with it).
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_cgroup(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for dir in self.directories() {
            if let Err(err) = remove_cgroup(&dir) {
                eprintln!("warning: could not remove cgroup {}: {err}", dir.display());
            }
        }
    }
}

/// A container outside any pod, removed on drop (also when a test panics).
#[derive(Debug)]
pub struct Container {
    name: String,
}

impl Container {
    /// `podman create --name NAME OPTIONS IMAGE ARGS`, not started.
    pub fn create(role: &str, options: &[&str], image: &str, args: &[&str]) -> Container {
        let container = Container {
            name: fresh_name(role),
        };
        let mut argv = vec!["create", "--name", &container.name];
        argv.extend_from_slice(options);
        argv.push(image);
        argv.extend_from_slice(args);
        expect(&argv);
        container
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts it and waits for it to exit; returns its output and podman's exit status
    /// (the container's own exit code when it ran).
    pub fn run(&self) -> Output {
        run(&["start", "--attach", &self.name])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let output = run(&["rm", "--force", "--time", "0", &self.name]);
        if !output.status.success() {
            eprintln!(
                "warning: could not remove container {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
