//! The installer against real directories (temporary ones): what it writes, what it
//! leaves alone, and that uninstalling gives back the primary's bytes.

use super::*;
use std::collections::BTreeMap;
use std::fs;

const PRIMARY: &str = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"node\",\n  \"plugins\": [\n    {\"type\": \"bridge\", \"bridge\": \"cni0\", \"ipam\": {\"type\": \"host-local\"}}\n  ]\n}\n";

struct Node {
    _root: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
    plugin: PathBuf,
}

fn node() -> Node {
    let root = tempfile::tempdir().expect("tempdir");
    let bin = root.path().join("bin");
    let conf = root.path().join("net.d");
    fs::create_dir(&bin).expect("bin dir");
    fs::create_dir(&conf).expect("conf dir");
    let plugin = root.path().join("meshinit");
    fs::write(&plugin, b"\x7fELF plugin bytes").expect("plugin");
    Node {
        _root: root,
        bin,
        conf,
        plugin,
    }
}

fn settings(node: &Node, excluded: &[&str]) -> InstallSettings {
    InstallSettings {
        cni_bin_dir: node.bin.clone(),
        cni_conf_dir: node.conf.clone(),
        cni_conf_file_name: None,
        chained: true,
        plugin_source: node.plugin.clone(),
        entry: EntrySettings {
            exclude_namespaces: excluded.iter().map(|s| s.to_string()).collect(),
            proxy_env: BTreeMap::new(),
        },
    }
}

/// Every file in a directory with its bytes, to compare whole directories.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

fn types_in(path: &Path) -> Vec<String> {
    let value: Value = serde_json::from_slice(&fs::read(path).expect("read")).expect("json");
    value["plugins"]
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["type"].as_str().expect("type").to_owned())
        .collect()
}

#[test]
fn plugin_is_copied_executable_and_only_once() {
    let node = node();
    let installer = Installer::new(settings(&node, &[]));
    assert!(installer.install_plugin().expect("installed"));
    let target = node.bin.join(PLUGIN_FILE);
    assert_eq!(
        fs::read(&target).expect("read"),
        fs::read(&node.plugin).expect("read")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&target).expect("stat").permissions().mode() & 0o777,
        0o755
    );
    assert!(
        !installer.install_plugin().expect("same bytes"),
        "second copy"
    );
    assert_eq!(snapshot(&node.bin).len(), 1, "no temporary file left");
}

#[test]
fn missing_plugin_source_is_named() {
    let node = node();
    fs::remove_file(&node.plugin).expect("rm");
    let err = Installer::new(settings(&node, &[]))
        .install_plugin()
        .expect_err("no source");
    assert!(
        err.to_string().contains(&node.plugin.display().to_string()),
        "{err}"
    );
}

#[test]
fn chained_install_then_uninstall_restores_the_conflist_byte_for_byte() {
    let node = node();
    fs::write(node.conf.join("10-node.conflist"), PRIMARY).expect("primary");
    fs::write(node.conf.join("20-other.conflist"), "not even json").expect("other");
    let before = snapshot(&node.conf);
    let installer = Installer::new(settings(&node, &["kube-system"]));
    installer.install_plugin().expect("plugin");
    assert!(installer.check().is_err(), "not ready before the entry");
    let primary = node.conf.join("10-node.conflist");
    assert_eq!(
        installer.ensure_entry().expect("ensured"),
        Ensured::Written(primary.clone())
    );
    assert_eq!(types_in(&primary), ["bridge", "meshinit-cni"]);
    installer.check().expect("ready");
    // Idempotent: nothing is written the second time.
    let installed = snapshot(&node.conf);
    assert_eq!(
        installer.ensure_entry().expect("ensured"),
        Ensured::Unchanged(primary)
    );
    assert_eq!(snapshot(&node.conf), installed);

    installer.uninstall().expect("uninstalled");
    assert_eq!(snapshot(&node.conf), before);
    assert!(!node.bin.join(PLUGIN_FILE).exists());
}

#[test]
fn single_conf_is_converted_and_restored_on_uninstall() {
    let node = node();
    let conf = "{\"cniVersion\":\"0.4.0\",\"name\":\"calico\",\"type\":\"calico\",\"mtu\":1440}";
    fs::write(node.conf.join("10-calico.conf"), conf).expect("primary");
    let before = snapshot(&node.conf);
    let installer = Installer::new(settings(&node, &[]));
    installer.install_plugin().expect("plugin");
    let list = node.conf.join("10-calico.conflist");
    assert_eq!(
        installer.ensure_entry().expect("ensured"),
        Ensured::Written(list.clone())
    );
    assert!(
        !node.conf.join("10-calico.conf").exists(),
        "the .conf is replaced by the list"
    );
    assert_eq!(types_in(&list), ["calico", "meshinit-cni"]);
    installer.check().expect("ready");
    assert_eq!(
        installer.ensure_entry().expect("again"),
        Ensured::Unchanged(list)
    );

    installer.uninstall().expect("uninstalled");
    assert_eq!(snapshot(&node.conf), before);
}

#[test]
fn a_primary_rewriting_its_file_gets_the_entry_back_and_keeps_its_new_version() {
    let node = node();
    let primary = node.conf.join("10-node.conflist");
    fs::write(&primary, PRIMARY).expect("primary");
    let installer = Installer::new(settings(&node, &[]));
    installer.install_plugin().expect("plugin");
    installer.ensure_entry().expect("ensured");
    // The primary CNI restarts and writes its own file again, with a change of its own.
    let rewritten = PRIMARY.replace("cni0", "cni1");
    fs::write(&primary, &rewritten).expect("rewrite");
    assert!(
        installer.check().is_err(),
        "not ready while the entry is gone"
    );
    assert_eq!(
        installer.ensure_entry().expect("again"),
        Ensured::Written(primary.clone())
    );
    assert_eq!(types_in(&primary), ["bridge", "meshinit-cni"]);
    installer.uninstall().expect("uninstalled");
    assert_eq!(fs::read_to_string(&primary).expect("read"), rewritten);
}

#[test]
fn an_entry_with_old_settings_is_replaced_and_uninstall_still_restores_the_original() {
    let node = node();
    let primary = node.conf.join("10-node.conflist");
    fs::write(&primary, PRIMARY).expect("primary");
    let old = Installer::new(settings(&node, &["old-ns"]));
    old.install_plugin().expect("plugin");
    old.ensure_entry().expect("ensured");
    // The agent is upgraded with other settings (a DaemonSet update).
    let new = Installer::new(settings(&node, &["kube-system"]));
    assert!(new.check().is_err(), "old settings do not count as ready");
    assert_eq!(
        new.ensure_entry().expect("replaced"),
        Ensured::Written(primary.clone())
    );
    let value: Value = serde_json::from_slice(&fs::read(&primary).expect("read")).expect("json");
    assert_eq!(types_in(&primary), ["bridge", "meshinit-cni"]);
    assert_eq!(
        value["plugins"][1]["exclude_namespaces"],
        serde_json::json!(["kube-system"])
    );
    new.uninstall().expect("uninstalled");
    assert_eq!(fs::read_to_string(&primary).expect("read"), PRIMARY);
}

#[test]
fn an_unparsable_primary_is_named_left_alone_and_not_ready() {
    for (name, text) in [
        ("10-broken.conflist", "{\"plugins\": ["),
        (
            "10-noplugins.conflist",
            "{\"cniVersion\":\"1.0.0\",\"name\":\"x\"}",
        ),
        (
            "10-empty.conflist",
            "{\"cniVersion\":\"1.0.0\",\"name\":\"x\",\"plugins\":[]}",
        ),
    ] {
        let node = node();
        fs::write(node.conf.join(name), text).expect("primary");
        fs::write(node.conf.join("20-good.conflist"), PRIMARY).expect("second");
        let before = snapshot(&node.conf);
        let installer = Installer::new(settings(&node, &[]));
        installer.install_plugin().expect("plugin");
        let err = installer.ensure_entry().expect_err(name);
        assert!(matches!(err, InstallError::Unparsable { .. }), "{err}");
        assert!(err.to_string().contains(name), "{err}");
        assert!(!err.is_waiting());
        // Not the next file either: the runtime uses the first one, so we must not pretend.
        assert_eq!(snapshot(&node.conf), before, "{name}: nothing written");
        assert!(installer.check().expect_err("not ready").contains(name));
    }
}

#[test]
fn an_unwritable_directory_fails_with_its_path_and_changes_nothing() {
    let node = node();
    let primary = node.conf.join("10-node.conflist");
    fs::write(&primary, PRIMARY).expect("primary");
    let installer = Installer::new(settings(&node, &[]));
    // A directory where the temporary file must go: the write fails even for root, for
    // whom permission bits would not.
    let blocker = node.conf.join(format!(
        "{OWN_PREFIX}.10-node.conflist.{}.tmp",
        std::process::id()
    ));
    fs::create_dir(&blocker).expect("blocker");
    let err = installer.ensure_entry().expect_err("cannot write");
    assert!(matches!(err, InstallError::Write { .. }), "{err}");
    assert!(err.to_string().contains("10-node.conflist"), "{err}");
    assert_eq!(fs::read_to_string(&primary).expect("read"), PRIMARY);
    assert!(installer.check().is_err());
}

#[test]
fn no_primary_yet_is_a_state_to_wait_in() {
    let node = node();
    let err = Installer::new(settings(&node, &[]))
        .ensure_entry()
        .expect_err("none");
    assert!(err.is_waiting(), "{err}");
}

#[test]
fn standalone_writes_its_own_list_and_leaves_the_primary_alone() {
    let node = node();
    let primary = node.conf.join("10-node.conflist");
    fs::write(&primary, PRIMARY).expect("primary");
    let mut s = settings(&node, &[]);
    s.chained = false;
    let installer = Installer::new(s);
    installer.install_plugin().expect("plugin");
    let own = node.conf.join(STANDALONE_FILE);
    assert_eq!(
        installer.ensure_entry().expect("ensured"),
        Ensured::Written(own.clone())
    );
    assert_eq!(types_in(&own), ["meshinit-cni"]);
    installer.check().expect("ready");
    assert_eq!(fs::read_to_string(&primary).expect("read"), PRIMARY);
    installer.uninstall().expect("uninstalled");
    assert!(!own.exists());
    assert_eq!(snapshot(&node.conf).len(), 1);
}

#[test]
fn configured_file_name_is_used_over_the_first_file() {
    let node = node();
    fs::write(node.conf.join("05-first.conflist"), PRIMARY).expect("first");
    fs::write(node.conf.join("10-node.conflist"), PRIMARY).expect("configured");
    let mut s = settings(&node, &[]);
    s.cni_conf_file_name = Some("10-node.conflist".into());
    let installer = Installer::new(s);
    installer.ensure_entry().expect("ensured");
    assert_eq!(
        types_in(&node.conf.join("10-node.conflist")),
        ["bridge", "meshinit-cni"]
    );
    assert_eq!(
        fs::read_to_string(node.conf.join("05-first.conflist")).expect("read"),
        PRIMARY
    );
}

#[test]
fn standalone_with_a_conf_name_writes_a_single_plugin_conf() {
    let node = node();
    let mut s = settings(&node, &[]);
    s.chained = false;
    s.cni_conf_file_name = Some("meshinit-cni.conf".into());
    let installer = Installer::new(s);
    installer.install_plugin().expect("plugin");
    let own = node.conf.join("meshinit-cni.conf");
    assert_eq!(
        installer.ensure_entry().expect("ensured"),
        Ensured::Written(own.clone())
    );
    let value: Value = serde_json::from_slice(&fs::read(&own).expect("read")).expect("json");
    assert_eq!(value["type"], "meshinit-cni");
    assert!(value.get("plugins").is_none());
    installer.check().expect("ready");
    assert_eq!(
        installer.ensure_entry().expect("again"),
        Ensured::Unchanged(own.clone())
    );
    // Someone else's content under that name is not ours: not ready until rewritten.
    fs::write(&own, PRIMARY).expect("overwrite");
    assert!(installer.check().is_err());
    installer.uninstall().expect("uninstalled");
    assert!(!own.exists());
}
