//! A tcpdump capture on every port of a `ferrynet lab`'s underlay (in its `-ul` namespace),
//! read back by filter, as payloads, or searched for a marker.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::lab::Lab;
use super::{need, within, Proc};

/// tcpdump on every port of the lab's underlay bridge (in the underlay namespace), or on one
/// host's underlay port, to a file.
pub struct Capture {
    file: PathBuf,
    proc: Option<Proc>,
}

impl Capture {
    /// Start capturing on every port of the underlay (returns once tcpdump writes).
    pub fn start(lab: &Lab) -> Capture {
        Capture::start_on(lab, &format!("{}-ul", lab.name), "any")
    }

    /// Start capturing on interface `iface` of namespace `ns` (a host's underlay port: what
    /// that host sends and receives).
    pub fn start_on(lab: &Lab, ns: &str, iface: &str) -> Capture {
        need("tcpdump", "tcpdump");
        let file = PathBuf::from(format!("/run/ferrynet-lab/{}/{ns}-{iface}.pcap", lab.name));
        let _ = std::fs::remove_file(&file);
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", iface])
            // Immediate mode: packets are written as they come, not in the kernel ring's
            // blocks (which a short capture would end before they are handed over).
            .args(["--immediate-mode", "-U", "-n", "-s", "0", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        let cap = Capture {
            file,
            proc: Some(Proc(child)),
        };
        // The file exists (with its header) once tcpdump captures.
        within(Duration::from_secs(10), || {
            match std::fs::metadata(&cap.file) {
                Ok(m) if m.len() >= 24 => Ok(()),
                _ => Err("tcpdump has not started".into()),
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        cap
    }

    /// Stop capturing.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            std::thread::sleep(Duration::from_millis(300));
            p.kill();
        }
    }

    /// The packets matching `filter`, as tcpdump prints them.
    pub fn matching(&self, filter: &str) -> Vec<String> {
        let o = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-n", filter])
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The UDP payloads of packets matching `filter` (hex dumps parsed back).
    pub fn payloads(&self, filter: &str) -> Vec<Vec<u8>> {
        let o = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-n", "-x", filter])
            .output()
            .expect("tcpdump -r -x");
        let mut packets: Vec<Vec<u8>> = Vec::new();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let t = line.trim_start();
            if let Some(hex) = t.strip_prefix("0x").and_then(|r| r.split_once(':')) {
                let bytes = hex.1.split_whitespace().flat_map(|w| {
                    (0..w.len() / 2).map(move |i| u8::from_str_radix(&w[2 * i..2 * i + 2], 16))
                });
                if let Some(p) = packets.last_mut() {
                    p.extend(bytes.filter_map(Result::ok));
                }
            } else {
                packets.push(Vec::new());
            }
        }
        packets
            .into_iter()
            .filter_map(|ip| {
                let hdr = match ip.first()? >> 4 {
                    4 => usize::from(ip[0] & 0x0f) * 4,
                    6 => 40,
                    _ => return None,
                };
                ip.get(hdr + 8..).map(<[u8]>::to_vec)
            })
            .collect()
    }

    /// Whether `marker` appears anywhere in the captured bytes.
    pub fn contains(&self, marker: &str) -> bool {
        let raw = std::fs::read(&self.file).expect("read capture");
        raw.windows(marker.len()).any(|w| w == marker.as_bytes())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}
