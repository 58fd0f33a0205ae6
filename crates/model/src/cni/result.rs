//! The CNI success result (ADD/CHECK output and `prevResult`), in every supported version's shape.

use std::cmp::Ordering;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::{compare_versions, is_supported, CniError};

/// Treats an explicit JSON `null` like an absent key (Go plugins emit `null` for nil slices).
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// DNS settings, both in a network configuration and in a result.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dns {
    /// Name server addresses, in priority order.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nameservers: Vec<String>,
    /// Local domain used for short-name lookups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains, in priority order.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub search: Vec<String>,
    /// Resolver options (e.g. `ndots:5`).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set (then results omit the `dns` key).
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// One interface a plugin created or configured.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// Hardware address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (1.1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; None for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// vhost-user socket path (1.1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// PCI address of the device (1.1 only).
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One address assigned to an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length, e.g. `10.0.0.2/24` (host bits kept).
    pub address: IpNet,
    /// Default gateway for this subnet, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into the result's `interfaces`; IPAM results leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route to install in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination network.
    pub dst: IpNet,
    /// Next hop; None means the default gateway the plugin picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU (1.1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (1.1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Route priority/metric (1.1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table id (1.1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Route scope, 0 = universe (1.1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    /// A route to `dst` via `gw` with no 1.1 extras.
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// A CNI success result.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    /// Spec version of this document.
    #[serde(default)]
    pub cni_version: String,
    /// Interfaces created or configured.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ips: Vec<IpConfig>,
    /// Routes installed.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub routes: Vec<Route>,
    /// DNS settings; omitted when empty.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Dns::is_empty"
    )]
    pub dns: Dns,
}

/// Whether `version` predates 1.1.0 (no interface mtu/socketPath/pciID, no route extras).
fn before_1_1(version: &str) -> bool {
    compare_versions(version, "1.1.0") == Ordering::Less
}

/// Whether `version` predates 1.0.0 (each ip carries `"version": "4"|"6"`).
fn before_1_0(version: &str) -> bool {
    compare_versions(version, "1.0.0") == Ordering::Less
}

impl CniResult {
    /// The result as `version` can express it: `cniVersion` set and 1.1-only fields dropped
    /// for older versions.
    pub fn downgrade(&self, version: &str) -> CniResult {
        let mut r = self.clone();
        r.cni_version = version.to_owned();
        if before_1_1(version) {
            for i in &mut r.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for rt in &mut r.routes {
                rt.mtu = None;
                rt.advmss = None;
                rt.priority = None;
                rt.table = None;
                rt.scope = None;
            }
        }
        r
    }

    /// The result document in `version`'s shape: 1.x as is (empty fields omitted), 0.3.x and
    /// 0.4.0 with `"version"` on each ip, and 1.1-only fields stripped before 1.1.0.
    ///
    /// Versions before 0.3.0 (the `ip4`/`ip6` shape) are not supported and get the 0.3 shape.
    pub fn to_json_for_version(&self, version: &str) -> Value {
        // Serializing plain structs with string keys into a Value cannot fail.
        let mut v = serde_json::to_value(self.downgrade(version)).unwrap_or_default();
        if before_1_0(version) {
            if let Some(ips) = v.get_mut("ips").and_then(Value::as_array_mut) {
                for (ip, cfg) in ips.iter_mut().zip(&self.ips) {
                    let family = if cfg.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    if let Some(obj) = ip.as_object_mut() {
                        obj.insert("version".to_owned(), Value::String(family.to_owned()));
                    }
                }
            }
        }
        v
    }

    /// Parses a `prevResult` (or a delegated plugin's output) written in `version`.
    ///
    /// Unsupported `version` → code 1; anything but a result-shaped object → code 6.
    /// The returned result's `cni_version` is `version`.
    pub fn from_prev_result(value: &Value, version: &str) -> Result<CniResult, CniError> {
        if !is_supported(version) {
            return Err(CniError::incompatible_version(version));
        }
        if !value.is_object() {
            return Err(CniError::decode(format!(
                "prevResult: expected a JSON object, got {}",
                json_kind(value)
            )));
        }
        let mut r = CniResult::deserialize(value)
            .map_err(|e| CniError::decode(format!("prevResult: {e}")))?;
        r.cni_version = version.to_owned();
        Ok(r)
    }
}

/// A short name for a JSON value's type, for error messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::cni::SUPPORTED_VERSIONS;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A bridge-style result using every 1.1 field.
    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "fn0".into(),
                    mac: Some("02:42:ac:11:00:01".into()),
                    mtu: Some(1500),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:42:ac:11:00:02".into()),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/c1".into()),
                    socket_path: Some("/run/vhost.sock".into()),
                    pci_id: Some("0000:00:1f.6".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: net("10.22.0.5/16"),
                    gateway: Some(ip("10.22.0.1")),
                    interface: Some(1),
                },
                IpConfig {
                    address: net("fd00:22::5/64"),
                    gateway: Some(ip("fd00:22::1")),
                    interface: Some(1),
                },
            ],
            routes: vec![
                Route::new(net("0.0.0.0/0"), None),
                Route {
                    mtu: Some(1400),
                    advmss: Some(1360),
                    priority: Some(100),
                    table: Some(254),
                    scope: Some(0),
                    ..Route::new(net("192.168.0.0/16"), Some(ip("10.22.0.1")))
                },
            ],
            dns: Dns {
                nameservers: vec!["10.22.0.1".into()],
                domain: Some("example.org".into()),
                search: vec!["svc.example.org".into()],
                options: vec!["ndots:5".into()],
            },
        }
    }

    #[test]
    fn v1_1_shape() {
        assert_eq!(
            sample().to_json_for_version("1.1.0"),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "fn0", "mac": "02:42:ac:11:00:01", "mtu": 1500},
                    {"name": "eth0", "mac": "02:42:ac:11:00:02", "mtu": 1450,
                     "sandbox": "/var/run/netns/c1", "socketPath": "/run/vhost.sock",
                     "pciID": "0000:00:1f.6"}
                ],
                "ips": [
                    {"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 1},
                    {"address": "fd00:22::5/64", "gateway": "fd00:22::1", "interface": 1}
                ],
                "routes": [
                    {"dst": "0.0.0.0/0"},
                    {"dst": "192.168.0.0/16", "gw": "10.22.0.1", "mtu": 1400, "advmss": 1360,
                     "priority": 100, "table": 254, "scope": 0}
                ],
                "dns": {"nameservers": ["10.22.0.1"], "domain": "example.org",
                        "search": ["svc.example.org"], "options": ["ndots:5"]}
            })
        );
    }

    #[test]
    fn v1_0_strips_1_1_fields() {
        let v = sample().to_json_for_version("1.0.0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["interfaces"][1],
            json!({"name": "eth0", "mac": "02:42:ac:11:00:02", "sandbox": "/var/run/netns/c1"})
        );
        assert_eq!(
            v["interfaces"][0],
            json!({"name": "fn0", "mac": "02:42:ac:11:00:01"})
        );
        assert_eq!(
            v["routes"][1],
            json!({"dst": "192.168.0.0/16", "gw": "10.22.0.1"})
        );
        assert_eq!(
            v["ips"][0],
            json!({"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 1})
        );
        assert!(v["ips"][0].get("version").is_none());
    }

    #[test]
    fn v0_x_adds_ip_version() {
        for ver in ["0.3.0", "0.3.1", "0.4.0"] {
            let v = sample().to_json_for_version(ver);
            assert_eq!(v["cniVersion"], ver);
            assert_eq!(
                v["ips"],
                json!([
                    {"version": "4", "address": "10.22.0.5/16", "gateway": "10.22.0.1",
                     "interface": 1},
                    {"version": "6", "address": "fd00:22::5/64", "gateway": "fd00:22::1",
                     "interface": 1}
                ])
            );
            assert!(v["interfaces"][1].get("pciID").is_none());
            assert!(v["interfaces"][0].get("mtu").is_none());
            assert!(v["routes"][1].get("table").is_none());
            assert_eq!(v["dns"]["nameservers"], json!(["10.22.0.1"]));
        }
    }

    #[test]
    fn empty_result_omits_everything_optional() {
        let r = CniResult::default();
        assert_eq!(
            r.to_json_for_version("1.0.0"),
            json!({"cniVersion": "1.0.0"})
        );
        assert_eq!(
            r.to_json_for_version("0.4.0"),
            json!({"cniVersion": "0.4.0"})
        );
    }

    #[test]
    fn parses_0_4_0_prev_result() {
        // The shape a 0.4.0 bridge plugin prints.
        let doc = json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "cni0", "mac": "0a:58:0a:f4:00:01"},
                {"name": "veth1234", "mac": "ee:1b:66:59:f1:0a"},
                {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/x"}
            ],
            "ips": [{"version": "4", "interface": 2, "address": "10.244.0.5/24",
                     "gateway": "10.244.0.1"}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
            "dns": {}
        });
        let r = CniResult::from_prev_result(&doc, "0.4.0").unwrap();
        assert_eq!(r.cni_version, "0.4.0");
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.interfaces[2].sandbox.as_deref(), Some("/var/run/netns/x"));
        assert_eq!(r.ips[0].address, net("10.244.0.5/24"));
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(r.routes[0].gw, Some(ip("10.244.0.1")));
        assert!(r.dns.is_empty());
        // And it re-encodes to the same document.
        assert_eq!(r.to_json_for_version("0.4.0"), {
            let mut d = doc.clone();
            d.as_object_mut().unwrap().remove("dns");
            d
        });
    }

    #[test]
    fn parses_1_0_ipam_result_and_nulls() {
        // An IPAM result has no interfaces; Go plugins may write null for empty lists.
        let doc = json!({
            "cniVersion": "1.0.0",
            "interfaces": null,
            "ips": [{"address": "10.1.0.7/16", "gateway": "10.1.0.1"}],
            "routes": null,
            "dns": {"nameservers": null}
        });
        let r = CniResult::from_prev_result(&doc, "1.0.0").unwrap();
        assert!(r.interfaces.is_empty() && r.routes.is_empty() && r.dns.is_empty());
        assert_eq!(r.ips[0].interface, None);
        assert_eq!(
            r.to_json_for_version("1.0.0"),
            json!({"cniVersion": "1.0.0",
                   "ips": [{"address": "10.1.0.7/16", "gateway": "10.1.0.1"}]})
        );
    }

    #[test]
    fn prev_result_version_comes_from_the_config() {
        let doc = json!({"cniVersion": "0.3.1", "ips": []});
        let r = CniResult::from_prev_result(&doc, "1.0.0").unwrap();
        assert_eq!(r.cni_version, "1.0.0");
        let r = CniResult::from_prev_result(&json!({}), "1.1.0").unwrap();
        assert_eq!(
            r,
            CniResult {
                cni_version: "1.1.0".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn prev_result_errors() {
        for bad in [
            json!(null),
            json!([]),
            json!("x"),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "gateway": "nope"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}),
            json!({"interfaces": [{"mac": "aa:bb:cc:dd:ee:ff"}]}),
            json!({"routes": [{"gw": "10.0.0.1"}]}),
            json!({"routes": {}}),
            json!({"dns": {"nameservers": "10.0.0.1"}}),
        ] {
            let e = CniResult::from_prev_result(&bad, "1.0.0").unwrap_err();
            assert_eq!(e.code, 6, "{bad} gave {e}");
            assert!(e.msg.starts_with("prevResult"), "{}", e.msg);
        }
        assert_eq!(
            CniResult::from_prev_result(&json!({}), "0.2.0")
                .unwrap_err()
                .code,
            1
        );
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32)
                .prop_map(|(o, p)| IpNet::V4(ipnet::Ipv4Net::new(o.into(), p).unwrap())),
            (any::<[u8; 16]>(), 0u8..=128)
                .prop_map(|(o, p)| IpNet::V6(ipnet::Ipv6Net::new(o.into(), p).unwrap())),
        ]
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    fn arb_str() -> impl Strategy<Value = String> {
        "[ -~]{0,20}"
    }

    fn arb_interface() -> impl Strategy<Value = Interface> {
        (
            "[a-z0-9]{1,15}",
            proptest::option::of("[0-9a-f:]{17}"),
            proptest::option::of(any::<u32>()),
            proptest::option::of(arb_str()),
            proptest::option::of(arb_str()),
            proptest::option::of(arb_str()),
        )
            .prop_map(|(name, mac, mtu, sandbox, socket_path, pci_id)| Interface {
                name,
                mac,
                mtu,
                sandbox,
                socket_path,
                pci_id,
            })
    }

    fn arb_ipconfig() -> impl Strategy<Value = IpConfig> {
        (
            arb_net(),
            proptest::option::of(arb_ip()),
            proptest::option::of(0usize..8),
        )
            .prop_map(|(address, gateway, interface)| IpConfig {
                address,
                gateway,
                interface,
            })
    }

    fn arb_route() -> impl Strategy<Value = Route> {
        (
            arb_net(),
            proptest::option::of(arb_ip()),
            proptest::collection::vec(proptest::option::of(any::<u32>()), 5),
        )
            .prop_map(|(dst, gw, x)| Route {
                dst,
                gw,
                mtu: x[0],
                advmss: x[1],
                priority: x[2],
                table: x[3],
                scope: x[4],
            })
    }

    fn arb_dns() -> impl Strategy<Value = Dns> {
        (
            proptest::collection::vec(arb_str(), 0..3),
            proptest::option::of(arb_str()),
            proptest::collection::vec(arb_str(), 0..3),
            proptest::collection::vec(arb_str(), 0..3),
        )
            .prop_map(|(nameservers, domain, search, options)| Dns {
                nameservers,
                domain,
                search,
                options,
            })
    }

    fn arb_result() -> impl Strategy<Value = CniResult> {
        (
            proptest::collection::vec(arb_interface(), 0..4),
            proptest::collection::vec(arb_ipconfig(), 0..4),
            proptest::collection::vec(arb_route(), 0..4),
            arb_dns(),
        )
            .prop_map(|(interfaces, ips, routes, dns)| CniResult {
                cni_version: "1.1.0".into(),
                interfaces,
                ips,
                routes,
                dns,
            })
    }

    proptest! {
        #[test]
        fn round_trips_1_1(r in arb_result()) {
            let v = r.to_json_for_version("1.1.0");
            let back = CniResult::from_prev_result(&v, "1.1.0").unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn round_trips_every_version_as_downgraded(
            r in arb_result(),
            ver in proptest::sample::select(SUPPORTED_VERSIONS),
        ) {
            let v = r.to_json_for_version(ver);
            // Each ip carries a family exactly when the version predates 1.0.
            if let Some(ips) = v.get("ips").and_then(Value::as_array) {
                for ip in ips {
                    prop_assert_eq!(ip.get("version").is_some(), ver.starts_with("0."));
                }
            }
            let back = CniResult::from_prev_result(&v, ver).unwrap();
            prop_assert_eq!(back, r.downgrade(ver));
        }
    }
}
