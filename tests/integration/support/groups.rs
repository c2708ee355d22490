//! Group names for commands run in a test namespace, without touching the host's files.

use std::path::PathBuf;

/// Gives `ip netns exec` in one namespace an /etc/group that knows the group names Istio's
/// cases use (`java`, `ftp`), so iptables and nft can resolve them without touching the
/// host's.
pub struct GroupOverlay {
    dir: PathBuf,
}

impl GroupOverlay {
    pub fn new(netns: &str) -> GroupOverlay {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns overlay");
        let mut groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        for (name, gid) in [("java", 20001), ("ftp", 20002)] {
            if !groups.lines().any(|l| l.starts_with(&format!("{name}:"))) {
                groups.push_str(&format!("{name}:x:{gid}:\n"));
            }
        }
        std::fs::write(dir.join("group"), groups).expect("write overlay group file");
        GroupOverlay { dir }
    }
}

impl Drop for GroupOverlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
