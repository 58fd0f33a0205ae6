//! The soak's short version (issue 17, part 6): two minutes of `bench/soak.py` churn in a
//! 3-host lab with an agent killed every 40 s and etcd restarted once, then its zero-leak
//! audit of the kernels and the store. The 30-minute run is in docs/RELIABILITY.md.

mod common;

use std::process::Command;

#[test]
fn two_minutes_of_churn_leave_nothing_behind() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let o = Command::new("python3")
        .arg(format!("{root}/bench/soak.py"))
        .args([
            "--minutes",
            "2",
            "--kill-every",
            "40",
            "--etcd-every",
            "90",
            "--name",
            "soakci",
        ])
        .env("FERRYNET_BIN", common::bin())
        .output()
        .expect("python3");
    let text = common::out(&o);
    assert!(o.status.success(), "soak failed:\n{text}");
    assert!(text.contains("| 2 |") || text.contains("| 2.0 |"), "{text}");
}
