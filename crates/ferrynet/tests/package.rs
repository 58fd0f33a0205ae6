//! The .deb as an operator installs it: built with cargo-deb (scripts/package.sh, from the
//! debug binary this test run built), installed with `dpkg --root` into a throwaway root whose
//! package database holds only the package's dependencies, then checked: the files and their
//! modes, `--version`, the units (`systemd-analyze verify` against that root), bash completion
//! loading, the man pages, and removal. Missing tools fail the test (scripts/deps.sh and
//! scripts/cargo-deb.sh install them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{must, need, out};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Build the .deb into `out_dir`; its path.
fn build_deb(out_dir: &Path) -> PathBuf {
    let o = Command::new("cargo").args(["deb", "--version"]).output();
    assert!(
        o.is_ok_and(|o| o.status.success()),
        "cargo-deb is missing: run scripts/cargo-deb.sh"
    );
    let o = Command::new(workspace().join("scripts/package.sh"))
        .args(["--profile", "dev", "--no-build", "--output"])
        .arg(out_dir)
        .output()
        .expect("running scripts/package.sh");
    assert!(o.status.success(), "scripts/package.sh: {}", out(&o));
    let debs: Vec<PathBuf> = std::fs::read_dir(out_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs[0].clone()
}

/// A root for dpkg: an empty file system whose package database lists exactly the packages
/// the .deb depends on, copied from this machine's database (so dpkg checks the real
/// dependency list instead of being told to ignore it).
fn throwaway_root(dir: &Path, deb: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let depends = must(&["dpkg-deb", "-f", deb.to_str().unwrap(), "Depends"]);
    let mut status = String::new();
    for dep in depends.split(',') {
        // `libc6 (>= 2.34)`, or alternatives `a | b`: the first one installed here.
        let names: Vec<&str> = dep
            .split('|')
            .map(|alt| alt.split_whitespace().next().unwrap_or(""))
            .collect();
        let found = names.iter().find_map(|n| {
            let o = Command::new("dpkg-query").args(["-s", n]).output().ok()?;
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
        });
        let stanza = found.unwrap_or_else(|| panic!("{dep} is not installed on this machine"));
        status.push_str(stanza.trim_end());
        status.push_str("\n\n");
        // Its (empty) file list, under the name dpkg uses (`libc6:amd64`).
        let o = Command::new("dpkg-query")
            .args(["-W", "-f", "${binary:Package}\n"])
            .args(&names)
            .output()
            .unwrap();
        for n in String::from_utf8_lossy(&o.stdout).lines() {
            std::fs::write(root.join(format!("var/lib/dpkg/info/{n}.list")), "").unwrap();
        }
    }
    std::fs::write(root.join("var/lib/dpkg/status"), status).unwrap();
    // What systemd brings on a real host: its targets and slices, which every service's
    // default dependencies name (sysinit.target, basic.target, system.slice).
    let units = root.join("lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for e in std::fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".target") || name.ends_with(".slice") {
            if let Ok(meta) = std::fs::metadata(e.path()) {
                if meta.is_file() {
                    std::fs::copy(e.path(), units.join(&name)).unwrap();
                }
            }
        }
    }
    root
}

/// `systemd-analyze verify` of a unit in `root` (warnings included in the output).
fn verify(root: &Path, unit: &str) -> (bool, String) {
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        // The man pages are checked below; systemd would look for them on this machine.
        .arg("--man=no")
        .arg(format!("/lib/systemd/system/{unit}"))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    (o.status.success(), out(&o))
}

fn dpkg(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        // The root has no shell or tools of its own: the package has no maintainer scripts,
        // and dpkg's own helpers (ldconfig, start-stop-daemon) come from this machine.
        .arg("--force-script-chrootless")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_deb_installs_into_a_clean_root_with_units_completions_and_man_pages() {
    need("dpkg", "dpkg");
    need("dpkg-deb", "dpkg");
    need("dpkg-shlibdeps", "dpkg-dev");
    need("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(&dir.path().join("out"));
    let deb_s = deb.to_str().unwrap();
    let depends = must(&["dpkg-deb", "-f", deb_s, "Depends"]);
    assert!(
        depends.contains("libc6") && depends.contains("nftables"),
        "{depends}"
    );
    assert_eq!(
        must(&["dpkg-deb", "-f", deb_s, "Package"]).trim(),
        "ferrynet"
    );
    assert!(
        !must(&["dpkg-deb", "-I", deb_s]).contains("postinst"),
        "no maintainer scripts: the units are installed, not enabled or started"
    );

    // Hostile: nothing outside the expected places, nothing setuid, setgid or world-writable.
    let listing = must(&["dpkg-deb", "-c", deb_s]);
    for line in listing.lines() {
        let mode = line.split_whitespace().next().unwrap_or("");
        let path = line.split_whitespace().last().unwrap_or("");
        assert!(
            [
                "./usr/bin/",
                "./usr/share/",
                "./lib/systemd/system/",
                "./etc/default/",
                "./etc/",
                "./lib/",
                "./usr/",
                "./"
            ]
            .iter()
            .any(|p| path.starts_with(p)),
            "unexpected path {path}"
        );
        assert!(!path.starts_with("./usr/local"), "{path}");
        assert!(
            !mode.contains('s') && !mode.contains('S') && mode.get(8..9) != Some("w"),
            "{line}"
        );
    }

    let root = throwaway_root(dir.path(), &deb);
    let o = dpkg(&root, &["-i", deb_s]);
    assert!(o.status.success(), "dpkg -i: {}", out(&o));
    let status = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${Status} ${Version}", "ferrynet"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.starts_with("install ok installed"), "{status}");

    // The binary runs and names its version and commit.
    let bin = root.join("usr/bin/ferrynet");
    let v = must(&[bin.to_str().unwrap(), "--version"]);
    assert!(
        v.starts_with(&format!("ferrynet {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(
        !v.contains("commit unknown"),
        "built from a git checkout: {v}"
    );

    // The units, verified by systemd against the installed root (ExecStart must exist there).
    let units = root.join("lib/systemd/system");
    for unit in ["ferrynet-agent.service", "ferrynet-docker-plugin.service"] {
        let p = units.join(unit);
        assert!(p.exists(), "{unit} missing");
        let text = std::fs::read_to_string(&p).unwrap();
        for want in [
            "Type=notify",
            "Restart=on-failure",
            "After=network-online.target",
        ] {
            assert!(text.contains(want), "{unit}: no {want}");
        }
        assert!(
            !text.contains("Requires=etcd"),
            "{unit}: an etcd restart must not stop it"
        );
        let (ok, text) = verify(&root, unit);
        assert!(ok, "systemd-analyze verify {unit}: {text}");
        // A unit whose problems are only warnings still passes; ferrynet's have none.
        assert!(
            !text.contains(unit),
            "systemd-analyze verify {unit}: {text}"
        );
        // The command lines parse with the installed binary's own definition.
        let exec = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=").map(str::to_string))
            .unwrap();
        let argv: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(argv[0], "/usr/bin/ferrynet");
        ferrynet::cli::check_args(&argv).unwrap_or_else(|e| panic!("{exec}: {e}"));
    }
    // The check is not blind: a unit whose binary is missing fails, a misspelt setting warns.
    let agent_unit = std::fs::read_to_string(units.join("ferrynet-agent.service")).unwrap();
    std::fs::write(
        units.join("fnt-nobin.service"),
        agent_unit.replace("/usr/bin/ferrynet", "/usr/bin/ferrynot"),
    )
    .unwrap();
    assert!(!verify(&root, "fnt-nobin.service").0);
    std::fs::write(
        units.join("fnt-typo.service"),
        agent_unit.replace("Type=notify", "Type=notfy"),
    )
    .unwrap();
    assert!(verify(&root, "fnt-typo.service")
        .1
        .contains("fnt-typo.service"));
    // The settings file is a conffile (kept on upgrade and remove).
    let conffiles = std::fs::read_to_string(root.join("var/lib/dpkg/info/ferrynet.conffiles"))
        .unwrap_or_default();
    assert!(conffiles.contains("/etc/default/ferrynet"), "{conffiles:?}");

    // Bash completion loads and completes subcommands and flags.
    let bash = root.join("usr/share/bash-completion/completions/ferrynet");
    let script = format!(
        "source {}; complete -p ferrynet; COMP_WORDS=(ferrynet netw); COMP_CWORD=1; \
         COMP_LINE='ferrynet netw'; COMP_POINT=13; _ferrynet ferrynet netw ferrynet; \
         echo \"words: ${{COMPREPLY[*]}}\"",
        bash.display()
    );
    let o = Command::new("bash")
        .args(["--norc", "-c", &script])
        .output()
        .unwrap();
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("-F _ferrynet ferrynet"), "{text}");
    assert!(text.contains("words: network"), "{text}");
    for (p, want) in [
        (
            "usr/share/zsh/vendor-completions/_ferrynet",
            "#compdef ferrynet",
        ),
        (
            "usr/share/fish/vendor_completions.d/ferrynet.fish",
            "complete -c ferrynet",
        ),
    ] {
        let t = std::fs::read_to_string(root.join(p)).unwrap_or_default();
        assert!(t.contains(want), "{p}");
    }

    // Man pages: the top page and one per subcommand, gzip'd troff.
    let man = root.join("usr/share/man/man1");
    for page in [
        "ferrynet.1.gz",
        "ferrynet-agent.1.gz",
        "ferrynet-network-create.1.gz",
        "ferrynet-logs.1.gz",
    ] {
        let p = man.join(page);
        let text = must(&["gzip", "-dc", p.to_str().unwrap()]);
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {}",
            &text[..text.len().min(200)]
        );
    }
    let top = must(&[
        "gzip",
        "-dc",
        man.join("ferrynet-agent.1.gz").to_str().unwrap(),
    ]);
    assert!(
        top.contains("FERRYNET_AGENT_HTTP"),
        "the man page names the variables"
    );

    // Removal takes everything but the conffile.
    let o = dpkg(&root, &["-r", "ferrynet"]);
    assert!(o.status.success(), "dpkg -r: {}", out(&o));
    assert!(!bin.exists() && !units.join("ferrynet-agent.service").exists());
    assert!(!root.join("usr/share/man/man1/ferrynet.1.gz").exists());
    assert!(root.join("etc/default/ferrynet").exists());
}
