//! Finding a running pod's network namespace from `/proc`, with nothing remembered: every
//! process of a pod (its sandbox's pause process, its containers') sits in a cgroup whose
//! path names the pod's UID, whatever the runtime, under both kubelet cgroup drivers:
//!
//! ```text
//! cgroupfs:  …/kubepods/besteffort/pod1b4e…-…/<container id>
//! systemd:   …/kubepods-besteffort-pod1b4e…_….slice/cri-containerd-<id>.scope
//! ```
//!
//! So the agent (with the node's PID namespace, `hostPID`) indexes `/proc/*/cgroup` by pod
//! UID, opens `/proc/PID/ns/net` of one of the pod's processes and then reads that
//! process's cgroup again: if it still names the pod, the namespace it opened is the pod's
//! (a PID reused in between would name another cgroup). Nothing depends on the runtime's
//! netns paths or on state the agent kept, so it works the same after an agent restart and
//! after a node reboot (the pods' processes are new, and so is the index).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("no process of the pod (a cgroup naming pod UID {uid}) in {proc_root}: its sandbox is not running, or the agent does not see the node's processes (hostPID)")]
    NoProcess { uid: String, proc_root: PathBuf },
    #[error("cannot open {path}: {source} (the agent needs CAP_SYS_PTRACE to open another user's namespaces)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pod's process {pid} is in the agent's own network namespace (a hostNetwork pod): not a pod namespace")]
    NodeNamespace { pid: u32 },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The pod UID a cgroup path names, if any (lower case, with dashes).
pub fn pod_uid_of_cgroup(path: &str) -> Option<String> {
    for segment in path.split('/').rev() {
        let segment = segment.strip_suffix(".slice").unwrap_or(segment);
        // cgroupfs: "pod<uid>"; systemd: "kubepods-<qos>-pod<uid with _>".
        let candidate = match segment.rfind("pod") {
            Some(0) => &segment[3..],
            Some(at) if segment[..at].ends_with('-') => &segment[at + 3..],
            _ => continue,
        };
        let uid = candidate.replace('_', "-").to_ascii_lowercase();
        if is_uid(&uid) {
            return Some(uid);
        }
    }
    None
}

fn is_uid(text: &str) -> bool {
    text.len() == 36
        && text.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The pod UID named by any line of a `/proc/PID/cgroup` file.
pub fn pod_uid_of_process(cgroup_file: &str) -> Option<String> {
    cgroup_file
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(pod_uid_of_cgroup)
}

/// The node's processes by pod UID, rebuilt when a lookup misses or finds a stale entry.
#[derive(Debug)]
pub struct PodProcesses {
    proc_root: PathBuf,
    index: Mutex<HashMap<String, Vec<u32>>>,
}

impl PodProcesses {
    pub fn new(proc_root: PathBuf) -> PodProcesses {
        PodProcesses {
            proc_root,
            index: Mutex::new(HashMap::new()),
        }
    }

    fn scan(&self) -> HashMap<String, Vec<u32>> {
        let mut index: HashMap<String, Vec<u32>> = HashMap::new();
        let Ok(entries) = std::fs::read_dir(&self.proc_root) else {
            return index;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A process may end while it is read; it is simply not indexed.
            let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
                continue;
            };
            if let Some(uid) = pod_uid_of_process(&cgroup) {
                index.entry(uid).or_default().push(pid);
            }
        }
        for pids in index.values_mut() {
            // The lowest PID is usually the sandbox's pause process, the longest-lived.
            pids.sort_unstable();
        }
        index
    }

    /// The network namespace of pod `uid`, open.
    pub fn open(&self, uid: &str) -> Result<File, NetnsError> {
        let uid = uid.to_ascii_lowercase();
        let cached = self
            .index
            .lock()
            .ok()
            .and_then(|index| index.get(&uid).cloned());
        if let Some(pids) = cached {
            if let Some(found) = self.open_first(&uid, &pids)? {
                return Ok(found);
            }
        }
        let index = self.scan();
        let pids = index.get(&uid).cloned().unwrap_or_default();
        if let Ok(mut slot) = self.index.lock() {
            *slot = index;
        }
        self.open_first(&uid, &pids)?
            .ok_or_else(|| NetnsError::NoProcess {
                uid,
                proc_root: self.proc_root.clone(),
            })
    }

    fn open_first(&self, uid: &str, pids: &[u32]) -> Result<Option<File>, NetnsError> {
        let own = own_namespace(&self.proc_root)?;
        for &pid in pids {
            let dir = self.proc_root.join(pid.to_string());
            let path = dir.join("ns/net");
            let netns = match File::open(&path) {
                Ok(file) => file,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(NetnsError::Open { path, source }),
            };
            // Still the pod's process now that its namespace is open: a PID reused since
            // the index was made belongs to another cgroup.
            let still = std::fs::read_to_string(dir.join("cgroup"))
                .ok()
                .and_then(|c| pod_uid_of_process(&c));
            if still.as_deref() != Some(uid) {
                continue;
            }
            let meta = netns.metadata().map_err(|source| NetnsError::Read {
                path: path.clone(),
                source,
            })?;
            if (meta.dev(), meta.ino()) == own {
                return Err(NetnsError::NodeNamespace { pid });
            }
            return Ok(Some(netns));
        }
        Ok(None)
    }
}

fn own_namespace(proc_root: &Path) -> Result<(u64, u64), NetnsError> {
    let path = proc_root.join("thread-self/ns/net");
    let own = if path.exists() {
        path
    } else {
        PathBuf::from("/proc/thread-self/ns/net")
    };
    std::fs::metadata(&own)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|source| NetnsError::Read { path: own, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";

    #[test]
    fn uid_from_both_cgroup_drivers() {
        for path in [
            "/kubepods/besteffort/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/0a1b2c",
            "/meshinit-k8s/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/0a1b2c",
            "/kubepods/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-0a1b.scope",
            "/kubepods.slice/kubepods-pod1B4E28BA_2FA1_11D2_883F_0016D3CCA427.slice",
        ] {
            assert_eq!(pod_uid_of_cgroup(path).as_deref(), Some(UID), "{path}");
        }
        for path in [
            "/",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods/besteffort/podnot-a-uid/0a1b",
            "/system.slice/ipod1b4e28ba-2fa1-11d2-883f-0016d3cca427.service",
        ] {
            assert_eq!(pod_uid_of_cgroup(path), None, "{path}");
        }
        let file = "12:pids:/\n4:memory:/kubepods/besteffort/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/c1\n0::/\n";
        assert_eq!(pod_uid_of_process(file).as_deref(), Some(UID));
    }

    /// A proc tree of plain files: a pod's process found by its cgroup, a process of
    /// another pod and one that is no pod's skipped, and a missing pod named in the error.
    #[test]
    fn finds_the_pods_process_in_a_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path();
        let write = |pid: &str, cgroup: &str, netns: &str| {
            let p = proc_root.join(pid);
            std::fs::create_dir_all(p.join("ns")).unwrap();
            std::fs::write(p.join("cgroup"), cgroup).unwrap();
            std::fs::write(p.join("ns/net"), netns).unwrap();
        };
        write("1", "0::/init.scope\n", "node");
        write(
            "40",
            "0::/kubepods/besteffort/pod0b4e28ba-2fa1-11d2-883f-0016d3cca427/x\n",
            "other",
        );
        write(
            "77",
            &format!("0::/kubepods/besteffort/pod{UID}/pause\n"),
            "pod",
        );
        std::fs::create_dir_all(proc_root.join("thread-self/ns")).unwrap();
        std::fs::write(proc_root.join("thread-self/ns/net"), "agent").unwrap();
        let processes = PodProcesses::new(proc_root.to_owned());
        let found = processes.open(UID).expect("found");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &found, &mut text).unwrap();
        assert_eq!(text, "pod");
        // The process ends and another pod's takes its PID: not taken for this pod.
        std::fs::write(proc_root.join("77/cgroup"), "0::/kubepods/podx/y\n").unwrap();
        let err = processes.open(UID).expect_err("gone");
        assert!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
        assert!(err.to_string().contains(UID), "{err}");
    }
}
