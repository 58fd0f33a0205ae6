//! `ferrynet install-cni`: put the binary in the CNI bin dir and write a conflist.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::control::{Control, DEFAULT_STATE_DIR};

/// Arguments of `install-cni`.
#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Directory of CNI plugin binaries.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Directory of CNI network configurations.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The ferrynet network the conflist attaches to (it must exist).
    #[arg(long)]
    pub network: String,
    /// Order prefix of the conflist file name (runtimes pick the lowest).
    #[arg(long, default_value = "10")]
    pub priority: String,
}

/// The conflist for a network made with `ferrynet network create`.
pub fn conflist(network: &str, state_dir: &Path) -> serde_json::Value {
    let mut plugin = serde_json::json!({
        "type": "ferrynet",
        "capabilities": {"portMappings": true, "bandwidth": true, "ips": true, "mac": true}
    });
    if state_dir != Path::new(DEFAULT_STATE_DIR) {
        plugin["stateDir"] = serde_json::Value::String(state_dir.display().to_string());
    }
    // cniVersion 1.0.0: runtimes built on libcni before 1.2 (containerd 1.6 and 1.7, CRI-O of
    // their time) know only that key and cannot parse a 1.1.0 result ("unsupported CNI result
    // version"); newer ones read cniVersions and take 1.1.0.
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": network,
        "plugins": [plugin]
    })
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("ferrynet-tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

/// Copy the running binary to `<bin-dir>/ferrynet` and write `<conf-dir>/<prio>-ferrynet-<net>.conflist`.
pub async fn install_cni(ctl: &Control, a: InstallArgs) -> anyhow::Result<()> {
    if ctl.network(&a.network).await?.is_none() {
        return Err(super::exit::not_found(format!(
            "network {} does not exist; create it first with `ferrynet network create {}`",
            a.network, a.network
        )));
    }
    std::fs::create_dir_all(&a.bin_dir)
        .with_context(|| format!("creating {}", a.bin_dir.display()))?;
    std::fs::create_dir_all(&a.conf_dir)
        .with_context(|| format!("creating {}", a.conf_dir.display()))?;
    let exe = std::env::current_exe().context("finding the ferrynet binary")?;
    let bin = a.bin_dir.join("ferrynet");
    let bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    write_atomic(&bin, &bytes, 0o755)?;
    let conf = a
        .conf_dir
        .join(format!("{}-ferrynet-{}.conflist", a.priority, a.network));
    let text = serde_json::to_string_pretty(&conflist(&a.network, &ctl.paths().state_dir))?;
    write_atomic(&conf, text.as_bytes(), 0o644)?;
    println!("installed {}\nwrote {}", bin.display(), conf.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_names_network_and_capabilities() {
        let c = conflist("blue", Path::new(DEFAULT_STATE_DIR));
        assert_eq!(c["name"], "blue");
        assert_eq!(c["plugins"][0]["type"], "ferrynet");
        assert_eq!(c["plugins"][0]["capabilities"]["portMappings"], true);
        assert_eq!(
            c["cniVersion"], "1.0.0",
            "what containerd 1.6's libcni can parse"
        );
        assert_eq!(c["cniVersions"], serde_json::json!(["1.0.0", "1.1.0"]));
        // Runtimes pass pod bandwidth annotations only to plugins declaring the capability.
        assert_eq!(c["plugins"][0]["capabilities"]["bandwidth"], true);
        assert!(c["plugins"][0].get("stateDir").is_none());
        let c = conflist("blue", Path::new("/tmp/x"));
        assert_eq!(c["plugins"][0]["stateDir"], "/tmp/x");
    }
}
