//! Putting meshinit-cni on the node and taking it off again: the plugin binary in
//! `cniBinDir`, its entry in the primary network's configuration in `cniConfDir` (or a
//! standalone list of its own with `chained: false`).
//!
//! What it found is kept next to the configuration (`.meshinit-cni.<name>.orig`, which no
//! runtime loads), so that uninstalling restores the primary's file byte for byte,
//! including a `.conf` that installing converted to a `.conflist`.

use crate::conflist::{self, EntrySettings, NetworkConfig};
use crate::error::InstallError;
use crate::files::{self, OWN_PREFIX};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The plugin's name in `cniBinDir`: the name under which the meshinit binary acts as the
/// CNI plugin (src/main.rs).
pub const PLUGIN_FILE: &str = "meshinit-cni";
/// meshinit-cni's own list with `chained: false`, named to sort after any primary's.
pub const STANDALONE_FILE: &str = "YYY-meshinit-cni.conflist";

#[derive(Debug, Clone)]
pub struct InstallSettings {
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_conf_file_name: Option<String>,
    pub chained: bool,
    /// The meshinit binary to copy in (the agent's image carries it).
    pub plugin_source: PathBuf,
    pub entry: EntrySettings,
}

/// What `ensure_entry` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The entry was already in place in this file.
    Unchanged(PathBuf),
    /// The entry was written to this file.
    Written(PathBuf),
}

pub struct Installer {
    settings: InstallSettings,
    entry: Value,
}

impl Installer {
    pub fn new(settings: InstallSettings) -> Self {
        let entry = conflist::plugin_entry(&settings.entry);
        Installer { settings, entry }
    }

    pub fn settings(&self) -> &InstallSettings {
        &self.settings
    }

    fn plugin_path(&self) -> PathBuf {
        self.settings.cni_bin_dir.join(PLUGIN_FILE)
    }

    fn standalone_path(&self) -> PathBuf {
        let name = self
            .settings
            .cni_conf_file_name
            .as_deref()
            .unwrap_or(STANDALONE_FILE);
        self.settings.cni_conf_dir.join(name)
    }

    /// What the standalone file must hold: its name says whether a runtime reads a list.
    fn standalone_bytes(&self) -> Vec<u8> {
        let single = !self
            .standalone_path()
            .to_string_lossy()
            .ends_with(".conflist");
        conflist::standalone(&self.settings.entry, single)
    }

    fn backup_path(&self, name: &str) -> PathBuf {
        self.settings
            .cni_conf_dir
            .join(format!("{OWN_PREFIX}.{name}.orig"))
    }

    /// Copies the plugin into `cniBinDir` unless the same bytes are already there.
    pub fn install_plugin(&self) -> Result<bool, InstallError> {
        let source = &self.settings.plugin_source;
        let bytes = std::fs::read(source).map_err(|source_err| InstallError::PluginSource {
            path: source.clone(),
            source: source_err,
        })?;
        let target = self.plugin_path();
        if std::fs::read(&target).is_ok_and(|current| current == bytes) {
            return Ok(false);
        }
        files::atomic_write(&target, &bytes, 0o755)?;
        Ok(true)
    }

    /// Puts meshinit-cni's entry in place (the configuration only: see `install_plugin`).
    /// Nothing is written when the file cannot be parsed.
    pub fn ensure_entry(&self) -> Result<Ensured, InstallError> {
        if !self.settings.chained {
            let path = self.standalone_path();
            let wanted = self.standalone_bytes();
            if std::fs::read(&path).is_ok_and(|current| current == wanted) {
                return Ok(Ensured::Unchanged(path));
            }
            files::atomic_write(&path, &wanted, 0o644)?;
            return Ok(Ensured::Written(path));
        }
        let dir = &self.settings.cni_conf_dir;
        let primary = files::primary_config(dir, self.settings.cni_conf_file_name.as_deref())?;
        let bytes = files::read(&primary)?;
        let config = parse(&primary, &bytes)?;
        let name = file_name(&primary);
        if !conflist::has_any_entry(&config) {
            // The primary's own version: what uninstalling puts back.
            let backup = self.backup_path(&name);
            if std::fs::read(&backup).map_or(true, |saved| saved != bytes) {
                files::atomic_write(&backup, &bytes, 0o600)?;
            }
        }
        let converting = config.is_single();
        let Some(new_bytes) = conflist::insert(config, &self.entry) else {
            return Ok(Ensured::Unchanged(primary));
        };
        // What goes out must load: checked, not assumed.
        parse(&primary, &new_bytes)?;
        let target = if converting {
            dir.join(format!("{}.conflist", stem(&name)))
        } else {
            primary.clone()
        };
        files::atomic_write(&target, &new_bytes, 0o644)?;
        if target != primary {
            // After the list is in place: until then the runtime keeps the old file.
            files::remove_if_present(&primary)?;
        }
        Ok(Ensured::Written(target))
    }

    /// Whether the node is set up: the plugin present and the entry, as configured now,
    /// in the file the runtime uses. Errors say why not.
    pub fn check(&self) -> Result<(), String> {
        if !self.plugin_path().is_file() {
            return Err(format!("{} is missing", self.plugin_path().display()));
        }
        if !self.settings.chained {
            let path = self.standalone_path();
            return match std::fs::read(&path) {
                Ok(bytes) if bytes == self.standalone_bytes() => Ok(()),
                Ok(_) => Err(format!(
                    "{} is not meshinit-cni's, as configured",
                    path.display()
                )),
                Err(err) => Err(format!("{}: {err}", path.display())),
            };
        }
        let path = files::primary_config(
            &self.settings.cni_conf_dir,
            self.settings.cni_conf_file_name.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let bytes = files::read(&path).map_err(|e| e.to_string())?;
        let config = parse(&path, &bytes).map_err(|e| e.to_string())?;
        if conflist::has_entry(&config, &self.entry) {
            Ok(())
        } else {
            Err(format!("{} has no meshinit-cni entry", path.display()))
        }
    }

    /// Removes meshinit-cni's entries, restoring what the primary had (byte for byte when
    /// the primary has not changed it since), and the plugin. Carries on past a failure and
    /// reports every one.
    pub fn uninstall(&self) -> Result<(), Vec<InstallError>> {
        let mut errors = Vec::new();
        if self.settings.chained {
            if let Err(err) = self.remove_entries(&mut errors) {
                errors.push(err);
            }
        } else if let Err(err) = files::remove_if_present(&self.standalone_path()) {
            errors.push(err);
        }
        if let Err(err) = files::remove_if_present(&self.plugin_path()) {
            errors.push(err);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn remove_entries(&self, errors: &mut Vec<InstallError>) -> Result<(), InstallError> {
        let dir = &self.settings.cni_conf_dir;
        for path in files::cni_config_files(dir)? {
            let Ok(bytes) = files::read(&path) else {
                continue;
            };
            // Not ours to touch: a file we cannot parse was never written by us.
            let Ok(config) = NetworkConfig::parse(&bytes) else {
                continue;
            };
            let Some(stripped) = conflist::remove(config) else {
                continue;
            };
            if let Err(err) = self.restore(&path, stripped) {
                errors.push(err);
            }
        }
        // Backups whose file is gone (the primary removed it) are stale.
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(OWN_PREFIX) && name.ends_with(".orig") {
                if let Err(err) = files::remove_if_present(&entry.path()) {
                    errors.push(err);
                }
            }
        }
        Ok(())
    }

    /// Writes back `path` without our entry: the saved original when it is the same
    /// configuration (so the bytes are the primary's own), else the stripped list.
    fn restore(
        &self,
        path: &Path,
        stripped: serde_json::Map<String, Value>,
    ) -> Result<(), InstallError> {
        let name = file_name(path);
        let mut originals = vec![name.clone()];
        if name.ends_with(".conflist") {
            originals.push(format!("{}.conf", stem(&name)));
            originals.push(format!("{}.json", stem(&name)));
        }
        for original in originals {
            let backup = self.backup_path(&original);
            let Ok(saved) = std::fs::read(&backup) else {
                continue;
            };
            let same = NetworkConfig::parse(&saved).is_ok_and(|c| c.into_list() == stripped);
            if same {
                let target = self.settings.cni_conf_dir.join(&original);
                files::atomic_write(&target, &saved, 0o644)?;
                if target != path {
                    files::remove_if_present(path)?;
                }
                return files::remove_if_present(&backup);
            }
        }
        files::atomic_write(path, &conflist::render(&Value::Object(stripped)), 0o644)
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<NetworkConfig, InstallError> {
    NetworkConfig::parse(bytes).map_err(|err| InstallError::Unparsable {
        path: path.to_owned(),
        reason: err.0,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(stem, _)| stem)
}

#[cfg(test)]
mod tests;
