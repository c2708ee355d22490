//! File operations the runtime must never see half done: an atomic replace (a temporary
//! file in the same directory, fsync, rename, fsync of the directory), and finding the
//! primary CNI configuration as containerd, CRI-O and the kubelet pick it.

use crate::error::InstallError;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Files of the agent's own in the configuration directory start with this, and end with
/// no CNI extension, so no runtime ever loads them.
pub const OWN_PREFIX: &str = ".meshinit-cni";

/// The extensions libcni (and so containerd, CRI-O, the kubelet) loads configurations from.
const CNI_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// Whether a runtime would load `name` as a CNI configuration.
pub fn is_cni_config_name(name: &str) -> bool {
    !name.starts_with(OWN_PREFIX)
        && Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CNI_EXTENSIONS.contains(&e))
}

/// Every CNI configuration file in `dir`, in the lexical order runtimes use.
pub fn cni_config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = fs::read_dir(dir).map_err(|source| InstallError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_cni_config_name(name))
        .collect();
    names.sort();
    Ok(names.into_iter().map(|name| dir.join(name)).collect())
}

/// The file the runtime uses for the pod network: `configured` when set (Istio's
/// `cniConfFileName`, falling back between `.conf` and `.conflist` as Istio does), else
/// the lexically first configuration file.
pub fn primary_config(dir: &Path, configured: Option<&str>) -> Result<PathBuf, InstallError> {
    if let Some(name) = configured {
        let path = dir.join(name);
        if path.exists() {
            return Ok(path);
        }
        let sibling = match name.strip_suffix(".conflist") {
            Some(stem) => dir.join(format!("{stem}.conf")),
            None => dir.join(format!("{name}list")),
        };
        if (name.ends_with(".conf") || name.ends_with(".conflist")) && sibling.exists() {
            return Ok(sibling);
        }
        return Err(InstallError::ConfiguredMissing { path });
    }
    cni_config_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoPrimary {
            dir: dir.to_owned(),
        })
}

pub fn read(path: &Path) -> Result<Vec<u8>, InstallError> {
    fs::read(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the new one, never
/// a partial one: containerd reloads on the temporary file's rename.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let write_err = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!("{OWN_PREFIX}.{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename itself must survive a crash of the node.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

/// Removes `path`; a file already gone is not an error.
pub fn remove_if_present(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(InstallError::Write {
            path: path.to_owned(),
            source: err,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str) {
        fs::write(dir.join(name), "{}").expect("write");
    }

    #[test]
    fn primary_is_the_lexically_first_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "20-b.conf",
            "10-a.conflist",
            "05-readme.txt",
            ".meshinit-cni.00-x.conf.orig",
            "30-c.json",
        ] {
            touch(dir.path(), name);
        }
        assert_eq!(
            primary_config(dir.path(), None).expect("found"),
            dir.path().join("10-a.conflist")
        );
        let names: Vec<_> = cni_config_files(dir.path())
            .expect("listed")
            .into_iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["10-a.conflist", "20-b.conf", "30-c.json"]);
    }

    #[test]
    fn configured_name_wins_and_falls_back_between_conf_and_conflist() {
        let dir = tempfile::tempdir().expect("tempdir");
        touch(dir.path(), "10-a.conflist");
        touch(dir.path(), "20-b.conflist");
        assert_eq!(
            primary_config(dir.path(), Some("20-b.conflist")).expect("found"),
            dir.path().join("20-b.conflist")
        );
        // Istio's fallback: a .conf that was converted is found under .conflist.
        assert_eq!(
            primary_config(dir.path(), Some("20-b.conf")).expect("found"),
            dir.path().join("20-b.conflist")
        );
        let err = primary_config(dir.path(), Some("99-none.conflist")).expect_err("missing");
        assert!(err.is_waiting(), "{err}");
    }

    #[test]
    fn empty_dir_has_no_primary_and_says_which_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = primary_config(dir.path(), None).expect_err("none");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        assert!(err.is_waiting());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("10-a.conflist");
        fs::write(&path, "old").expect("write");
        atomic_write(&path, b"new", 0o644).expect("written");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
