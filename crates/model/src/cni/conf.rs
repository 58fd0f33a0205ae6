//! Network configuration: one plugin's config as a runtime hands it on stdin
//! ([`NetConf`]), and the configuration list a runtime reads from disk ([`NetConfList`]).

use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::gojson::{field, fold_object, leaf, Field, Shape};
use super::result::{json_kind, null_default};
use super::{highest_supported, is_supported, CniError, CniResult, Dns};
use crate::bandwidth::Bandwidth;
use crate::portmap::PortMapping;

/// `portMappings` entries (containerd: `HostPort`, `ContainerPort`, `Protocol`, `HostIP`).
const PORT_MAPPING: &[Field] = &[
    leaf("hostPort"),
    leaf("containerPort"),
    leaf("protocol"),
    leaf("hostIP"),
];
/// The `bandwidth` capability (containerd: `IngressRate`, `IngressBurst`, …).
const BANDWIDTH: &[Field] = &[
    leaf("ingressRate"),
    leaf("ingressBurst"),
    leaf("egressRate"),
    leaf("egressBurst"),
];
/// The `dns` capability (containerd: `Servers`, `Searches`, `Options`).
const RUNTIME_DNS: &[Field] = &[leaf("servers"), leaf("searches"), leaf("options")];
/// One host-local range (`ipRanges`, `ipam.ranges`).
const RANGE: &[Field] = &[
    leaf("subnet"),
    leaf("rangeStart"),
    leaf("rangeEnd"),
    leaf("gateway"),
];
/// The `runtimeConfig` object.
const RUNTIME_CONFIG: &[Field] = &[
    field("portMappings", Shape::List(&Shape::Object(PORT_MAPPING))),
    leaf("ips"),
    leaf("mac"),
    field("bandwidth", Shape::Object(BANDWIDTH)),
    field("dns", Shape::Object(RUNTIME_DNS)),
    field("ipRanges", Shape::List(&Shape::List(&Shape::Object(RANGE)))),
    leaf("aliases"),
];
/// The network configuration's DNS section (CNI's `DNS` type).
const CONF_DNS: &[Field] = &[
    leaf("nameservers"),
    leaf("domain"),
    leaf("search"),
    leaf("options"),
];
/// The `ipam` section as ferrynet reads it (host-local's shape).
const IPAM: &[Field] = &[
    leaf("type"),
    leaf("subnet"),
    leaf("rangeStart"),
    leaf("rangeEnd"),
    leaf("gateway"),
    field("ranges", Shape::List(&Shape::List(&Shape::Object(RANGE)))),
    leaf("routes"),
];
/// A `subnets` entry of ferrynet's own configuration.
const SUBNET: &[Field] = &[
    leaf("cidr"),
    leaf("gateway"),
    leaf("rangeStart"),
    leaf("rangeEnd"),
    leaf("exclude"),
];
/// A `cni.dev/valid-attachments` entry.
const ATTACHMENT: &[Field] = &[leaf("containerID"), leaf("ifname")];
/// Every key of a plugin configuration ferrynet knows: the spec's and its own. `args` and
/// `capabilities` are maps (their keys are data, matched exactly, as Go does for maps).
const NET_CONF: &[Field] = &[
    leaf("cniVersion"),
    leaf("name"),
    leaf("type"),
    field("runtimeConfig", Shape::Object(RUNTIME_CONFIG)),
    leaf("prevResult"),
    field("ipam", Shape::Object(IPAM)),
    field("dns", Shape::Object(CONF_DNS)),
    leaf("args"),
    field(
        "cni.dev/valid-attachments",
        Shape::List(&Shape::Object(ATTACHMENT)),
    ),
    leaf("capabilities"),
    leaf("bridge"),
    field("subnets", Shape::List(&Shape::Object(SUBNET))),
    leaf("mtu"),
    leaf("ipMasq"),
    leaf("internal"),
    leaf("mode"),
    leaf("isGateway"),
    leaf("hairpinMode"),
    leaf("stateDir"),
    leaf("store"),
];

/// A plugin configuration with its known keys spelled as ferrynet's types expect, matched the
/// way Go's decoder matches them (see [`super::gojson`]); code 6 for an ambiguous key.
pub fn canonical_conf(obj: Map<String, Value>) -> Result<Map<String, Value>, CniError> {
    fold_object(obj, NET_CONF, "").map_err(|e| CniError::decode(e.to_string()))
}

/// One attachment the runtime still considers valid (GC's `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    /// Container id of the attachment.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name of the attachment.
    pub ifname: String,
}

/// The `dns` capability: the runtime's resolver settings for the container (containerd sends
/// `Servers`, `Searches`, `Options`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RuntimeDns {
    /// Name server addresses.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub servers: Vec<String>,
    /// Search domains.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub searches: Vec<String>,
    /// Resolver options.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub options: Vec<String>,
}

/// One range of the `ipRanges` capability (host-local's range shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpRange {
    /// The subnet.
    pub subnet: ipnet::IpNet,
    /// First address to hand out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<IpAddr>,
    /// Last address to hand out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    /// The gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// The reserved `runtimeConfig` object: capability arguments from the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The `portMappings` capability.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub port_mappings: Vec<PortMapping>,
    /// The `ips` capability: requested addresses, CIDR (`10.0.0.5/24`) or bare (`10.0.0.5`).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ips: Vec<String>,
    /// The `mac` capability: requested hardware address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The `bandwidth` capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// The `dns` capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<RuntimeDns>,
    /// The `ipRanges` capability: range sets, as host-local's `ranges`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_ranges: Vec<Vec<IpRange>>,
    /// Other capabilities (aliases, …), kept as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RuntimeConfig {
    /// Whether no capability argument is present.
    pub fn is_empty(&self) -> bool {
        *self == RuntimeConfig::default()
    }

    /// The `ips` capability parsed into addresses with their prefix length when one was
    /// given; a malformed entry is a code 7 error.
    pub fn parsed_ips(&self) -> Result<Vec<(IpAddr, Option<u8>)>, CniError> {
        self.ips.iter().map(|s| parse_ip_request(s)).collect()
    }

    /// Checks what an ADD would act on, before it acts (code 7): every port mapping has a host
    /// and a container port, and the bandwidth limits fit an interface of `mtu` bytes.
    pub fn validate(&self, mtu: u32) -> Result<(), CniError> {
        for (i, m) in self.port_mappings.iter().enumerate() {
            for (key, port) in [
                ("hostPort", m.host_port),
                ("containerPort", m.container_port),
            ] {
                if port == 0 {
                    return Err(CniError::invalid_config(format!(
                        "runtimeConfig.portMappings[{i}]: {key} is 0 or missing; a published \
                         port needs a host port and a container port (1-65535)"
                    )));
                }
            }
            if let Some(ip) = m.host_ip.filter(|ip| ip.is_multicast()) {
                return Err(CniError::invalid_config(format!(
                    "runtimeConfig.portMappings[{i}]: hostIP {ip} is a multicast address"
                )));
            }
        }
        if let Some(b) = &self.bandwidth {
            b.shaping(mtu)
                .map_err(|e| CniError::invalid_config(format!("runtimeConfig.{e}")))?;
        }
        Ok(())
    }
}

/// Parses `addr` or `addr/prefix`, checking the prefix fits the family.
fn parse_ip_request(s: &str) -> Result<(IpAddr, Option<u8>), CniError> {
    let bad = || CniError::invalid_config(format!("runtimeConfig.ips: invalid address {s:?}"));
    match s.split_once('/') {
        None => s.parse().map(|ip| (ip, None)).map_err(|_| bad()),
        Some(_) => {
            let net: ipnet::IpNet = s.parse().map_err(|_| bad())?;
            Ok((net.addr(), Some(net.prefix_len())))
        }
    }
}

/// One plugin's network configuration, as received on stdin.
///
/// Unknown keys (our `bridge`, `subnets`, `mtu`, `ipMasq`, … and anything else) are kept in
/// `extra` so the config can be passed on unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version of this configuration.
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Plugin type (the binary name).
    #[serde(rename = "type")]
    pub type_: String,
    /// Capability arguments from the runtime.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "RuntimeConfig::is_empty"
    )]
    pub runtime_config: RuntimeConfig,
    /// The previous plugin's result in a chain (CHECK, chained ADD/DEL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// IPAM plugin configuration (`{"type": ..., ...}`), passed to the delegate as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    /// DNS settings for the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// The reserved `args` key (runtime-supplied arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// GC only: the attachments to keep; everything else may be removed.
    #[serde(
        default,
        rename = "cni.dev/valid-attachments",
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub valid_attachments: Vec<Attachment>,
    /// Every other key, preserved.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Parses bytes into a JSON object; code 6 when that fails.
fn decode_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, CniError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| CniError::decode(format!("{what} is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(CniError::decode(format!(
            "{what} must be a JSON object, got {}",
            json_kind(&other)
        ))),
    }
}

/// The string under `key`; code 7 naming the key when absent, empty or not a string.
fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, CniError> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(CniError::invalid_config(format!("{key:?} is empty"))),
        None | Some(Value::Null) => Err(CniError::invalid_config(format!(
            "missing required key {key:?}"
        ))),
        Some(other) => Err(CniError::invalid_config(format!(
            "{key:?} must be a string, got {}",
            json_kind(other)
        ))),
    }
}

/// Checks a network name per the spec: alphanumeric first, then alphanumerics, `_`, `.`, `-`.
fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::invalid_config(format!(
            "\"name\": invalid network name {name:?} (must start with a letter or digit and \
             contain only letters, digits, '_', '.' and '-')"
        )))
    }
}

impl NetConf {
    /// Parses stdin: not JSON → 6; missing `cniVersion`/`name`/`type` → 7;
    /// unsupported `cniVersion` → 1; a known key of the wrong shape → 6.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        Self::from_object(decode_object(bytes, "network configuration")?)
    }

    /// Like [`NetConf::parse`], from an already decoded JSON value.
    pub fn from_value(value: Value) -> Result<NetConf, CniError> {
        match value {
            Value::Object(m) => Self::from_object(m),
            other => Err(CniError::decode(format!(
                "network configuration must be a JSON object, got {}",
                json_kind(&other)
            ))),
        }
    }

    fn from_object(obj: Map<String, Value>) -> Result<NetConf, CniError> {
        let obj = canonical_conf(obj)?;
        let version = required_str(&obj, "cniVersion")?;
        if !is_supported(version) {
            return Err(CniError::incompatible_version(version));
        }
        validate_network_name(required_str(&obj, "name")?)?;
        required_str(&obj, "type")?;
        NetConf::deserialize(Value::Object(obj))
            .map_err(|e| CniError::decode(format!("network configuration: {e}")))
    }

    /// The `prevResult`, parsed in this config's version; None when absent.
    pub fn parsed_prev_result(&self) -> Result<Option<CniResult>, CniError> {
        self.prev_result
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| CniResult::from_prev_result(v, &self.cni_version))
            .transpose()
    }

    /// The IPAM plugin's `type`, when an `ipam` section with a string type is present.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam.as_ref()?.get("type")?.as_str()
    }

    /// Deserializes the plugin-specific keys (`extra`) into `T`; code 7 when they don't fit.
    pub fn plugin_config<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        T::deserialize(Value::Object(self.extra.clone()))
            .map_err(|e| CniError::invalid_config(format!("plugin configuration: {e}")))
    }

    /// The configuration as JSON, e.g. to hand to a delegated plugin.
    pub fn to_value(&self) -> Value {
        // Serializing a struct of strings and JSON values into a Value cannot fail.
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Accepts a bool or the strings "true"/"false" (hand-written configs use both).
fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(b),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("expected a boolean, got {s:?}"))),
        other => Err(serde::de::Error::custom(format!(
            "expected a boolean, got {}",
            json_kind(&other)
        ))),
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A network configuration list (`.conflist`) with its `plugins` chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConfList {
    /// Spec version of the list (may be empty when `cniVersions` is given).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    /// 1.1: every version the list conforms to; the highest supported one is used.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cni_versions: Vec<String>,
    /// Network name.
    pub name: String,
    /// Whether the runtime must skip CHECK.
    #[serde(
        default,
        deserialize_with = "lenient_bool",
        skip_serializing_if = "is_false"
    )]
    pub disable_check: bool,
    /// Whether the runtime must skip GC.
    #[serde(
        default,
        rename = "disableGC",
        deserialize_with = "lenient_bool",
        skip_serializing_if = "is_false"
    )]
    pub disable_gc: bool,
    /// 1.1: whether plugins must be inlined (no external plugin files).
    #[serde(
        default,
        deserialize_with = "lenient_bool",
        skip_serializing_if = "is_false"
    )]
    pub load_only_inlined_plugins: bool,
    /// The plugin configurations in chain order, without `name`/`cniVersion`.
    pub plugins: Vec<Value>,
    /// Other top-level keys, preserved.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl NetConfList {
    /// Parses a conflist: not JSON → 6; missing `name`, `cniVersion` (and `cniVersions`) or
    /// `plugins`, or a plugin without `type` → 7; no supported version → 1.
    pub fn parse(bytes: &[u8]) -> Result<NetConfList, CniError> {
        Self::from_object(decode_object(bytes, "network configuration list")?)
    }

    /// Parses either a conflist or a single plugin config (wrapped as a one-plugin list,
    /// as runtimes do for `.conf` files).
    pub fn parse_any(bytes: &[u8]) -> Result<NetConfList, CniError> {
        let obj = decode_object(bytes, "network configuration")?;
        if obj.contains_key("plugins") {
            return Self::from_object(obj);
        }
        let conf = NetConf::from_object(obj.clone())?;
        Ok(NetConfList {
            cni_version: conf.cni_version,
            cni_versions: Vec::new(),
            name: conf.name,
            disable_check: false,
            disable_gc: false,
            load_only_inlined_plugins: false,
            plugins: vec![Value::Object(obj)],
            extra: Map::new(),
        })
    }

    fn from_object(obj: Map<String, Value>) -> Result<NetConfList, CniError> {
        validate_network_name(required_str(&obj, "name")?)?;
        let has_versions = matches!(obj.get("cniVersions"), Some(Value::Array(a)) if !a.is_empty());
        if !has_versions {
            required_str(&obj, "cniVersion")?;
        }
        match obj.get("plugins") {
            Some(Value::Array(plugins)) if !plugins.is_empty() => {
                for (i, p) in plugins.iter().enumerate() {
                    let p = p.as_object().ok_or_else(|| {
                        CniError::invalid_config(format!(
                            "plugins[{i}] must be an object, got {}",
                            json_kind(p)
                        ))
                    })?;
                    required_str(p, "type").map_err(|e| {
                        CniError::invalid_config(format!("plugins[{i}]: {}", e.msg))
                    })?;
                }
            }
            Some(Value::Array(_)) => {
                return Err(CniError::invalid_config("\"plugins\" is empty"));
            }
            None | Some(Value::Null) => {
                return Err(CniError::invalid_config("missing required key \"plugins\""));
            }
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "\"plugins\" must be an array, got {}",
                    json_kind(other)
                )));
            }
        }
        let list = NetConfList::deserialize(Value::Object(obj))
            .map_err(|e| CniError::decode(format!("network configuration list: {e}")))?;
        list.effective_version()?;
        Ok(list)
    }

    /// The version the runtime would use: the highest supported of `cniVersions` when given,
    /// else `cniVersion`; code 1 when we support none of them.
    pub fn effective_version(&self) -> Result<String, CniError> {
        if let Some(v) = highest_supported(&self.cni_versions) {
            return Ok(v);
        }
        if is_supported(&self.cni_version) {
            return Ok(self.cni_version.clone());
        }
        let asked = if self.cni_version.is_empty() {
            self.cni_versions.join(", ")
        } else {
            self.cni_version.clone()
        };
        Err(CniError::incompatible_version(&asked))
    }

    /// Plugin `index`'s config as a runtime hands it over: the list's `name` and effective
    /// `cniVersion` injected. An index out of range is code 7.
    pub fn plugin_conf(&self, index: usize) -> Result<NetConf, CniError> {
        let plugin = self.plugins.get(index).ok_or_else(|| {
            CniError::invalid_config(format!(
                "plugin index {index} out of range ({} plugins)",
                self.plugins.len()
            ))
        })?;
        let mut obj = plugin.as_object().cloned().ok_or_else(|| {
            CniError::invalid_config(format!("plugins[{index}] must be an object"))
        })?;
        obj.insert("name".to_owned(), Value::String(self.name.clone()));
        obj.insert(
            "cniVersion".to_owned(),
            Value::String(self.effective_version()?),
        );
        NetConf::from_object(obj)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cni::SUPPORTED_VERSIONS;
    use crate::portmap::Protocol;

    fn conf_bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn ferrynet_conf(version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "ferry-net",
            "type": "ferrynet",
            "bridge": "fn0",
            "subnets": ["10.22.0.0/16", "fd00:22::/64"],
            "mtu": 1450,
            "ipMasq": true,
            "isGateway": true,
            "hairpinMode": false,
            "mode": "bridge",
            "storePath": "/var/lib/ferrynet",
            "capabilities": {"portMappings": true, "ips": true, "mac": true},
            "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"},
            "dns": {"nameservers": ["10.22.0.1"], "search": ["example.org"]},
            "args": {"cni": {"ips": ["10.22.0.9"]}},
            "runtimeConfig": {
                "portMappings": [
                    {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                    {"hostPort": 5353, "containerPort": 53, "protocol": "udp",
                     "hostIP": "127.0.0.1"},
                    {"hostPort": 9000, "containerPort": 9000, "hostIP": ""}
                ],
                "ips": ["10.22.0.9/16", "fd00:22::9"],
                "mac": "02:00:00:00:00:09",
                "bandwidth": {"ingressRate": 1000}
            }
        })
    }

    #[test]
    fn parses_every_supported_version() {
        for v in SUPPORTED_VERSIONS {
            let c = NetConf::parse(&conf_bytes(&ferrynet_conf(v))).unwrap();
            assert_eq!(c.cni_version, *v);
            assert_eq!(c.name, "ferry-net");
            assert_eq!(c.type_, "ferrynet");
            assert_eq!(c.ipam_type(), Some("host-local"));
            assert_eq!(c.dns.as_ref().unwrap().nameservers, vec!["10.22.0.1"]);
            assert_eq!(c.args.as_ref().unwrap()["cni"]["ips"][0], "10.22.0.9");
        }
    }

    #[test]
    fn keeps_plugin_keys_and_capabilities() {
        let c = NetConf::parse(&conf_bytes(&ferrynet_conf("1.1.0"))).unwrap();
        for key in [
            "bridge",
            "subnets",
            "mtu",
            "ipMasq",
            "isGateway",
            "hairpinMode",
            "mode",
            "storePath",
            "capabilities",
        ] {
            assert!(c.extra.contains_key(key), "{key} missing from extra");
        }
        // Reserved keys are parsed into fields, not duplicated into extra.
        for key in [
            "cniVersion",
            "name",
            "type",
            "ipam",
            "dns",
            "args",
            "runtimeConfig",
        ] {
            assert!(!c.extra.contains_key(key), "{key} leaked into extra");
        }
        let rc = &c.runtime_config;
        assert_eq!(rc.port_mappings.len(), 3);
        assert_eq!(rc.port_mappings[0].host_port, 8080);
        assert_eq!(rc.port_mappings[1].protocol, Protocol::Udp);
        assert_eq!(
            rc.port_mappings[1].host_ip,
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(rc.port_mappings[2].host_ip, None);
        assert_eq!(rc.port_mappings[2].protocol, Protocol::Tcp);
        assert_eq!(rc.mac.as_deref(), Some("02:00:00:00:00:09"));
        assert_eq!(rc.bandwidth.unwrap().ingress_rate, 1000);
        assert!(rc.extra.is_empty(), "{:?}", rc.extra);
        assert_eq!(
            rc.parsed_ips().unwrap(),
            vec![
                ("10.22.0.9".parse().unwrap(), Some(16)),
                ("fd00:22::9".parse().unwrap(), None)
            ]
        );
    }

    #[test]
    fn re_serializes_losslessly() {
        let original = ferrynet_conf("1.0.0");
        let c = NetConf::parse(&conf_bytes(&original)).unwrap();
        let mut expected = original.clone();
        // PortMapping normalizes: the default protocol is written out, "any" host IP dropped.
        expected["runtimeConfig"]["portMappings"][2] =
            json!({"hostPort": 9000, "containerPort": 9000, "protocol": "tcp"});
        assert_eq!(c.to_value(), expected);
        assert_eq!(NetConf::from_value(c.to_value()).unwrap(), c);
    }

    #[test]
    fn minimal_conf() {
        let c = NetConf::parse(br#"{"cniVersion":"0.3.0","name":"n","type":"t"}"#).unwrap();
        assert!(c.runtime_config.is_empty());
        assert!(c.prev_result.is_none() && c.ipam.is_none() && c.dns.is_none());
        assert!(c.valid_attachments.is_empty() && c.extra.is_empty());
        assert_eq!(c.parsed_prev_result().unwrap(), None);
        assert_eq!(
            c.to_value(),
            json!({"cniVersion": "0.3.0", "name": "n", "type": "t"})
        );
        // Explicit nulls for optional keys are fine.
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","runtimeConfig":null,
                "prevResult":null,"ipam":null,"cni.dev/valid-attachments":null}"#,
        )
        .unwrap();
        assert!(c.runtime_config.is_empty() && c.prev_result.is_none());
    }

    #[test]
    fn gc_conf_with_valid_attachments() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"ferry-net","type":"ferrynet",
                "cni.dev/valid-attachments":[
                    {"containerID":"c1","ifname":"eth0"},
                    {"containerID":"c2","ifname":"net1"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments,
            vec![
                Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                },
                Attachment {
                    container_id: "c2".into(),
                    ifname: "net1".into()
                }
            ]
        );
        assert!(c.extra.is_empty());
        assert_eq!(
            c.to_value()["cni.dev/valid-attachments"][1],
            json!({"containerID": "c2", "ifname": "net1"})
        );
    }

    #[test]
    fn prev_result_is_parsed_in_conf_version() {
        let c = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"portmap","prevResult":{
                "cniVersion":"0.4.0",
                "interfaces":[{"name":"eth0","sandbox":"/var/run/netns/a"}],
                "ips":[{"version":"4","address":"10.0.0.2/24","interface":0}]}}"#,
        )
        .unwrap();
        let r = c.parsed_prev_result().unwrap().unwrap();
        assert_eq!(r.cni_version, "0.4.0");
        assert_eq!(r.ips[0].address.to_string(), "10.0.0.2/24");
        let bad = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":7}}"#,
        )
        .unwrap();
        assert_eq!(bad.parsed_prev_result().unwrap_err().code, 6);
    }

    #[test]
    fn plugin_config_typed_view() {
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(rename_all = "camelCase")]
        struct Ours {
            bridge: String,
            mtu: Option<u32>,
            ip_masq: bool,
        }
        let c = NetConf::parse(&conf_bytes(&ferrynet_conf("1.1.0"))).unwrap();
        assert_eq!(
            c.plugin_config::<Ours>().unwrap(),
            Ours {
                bridge: "fn0".into(),
                mtu: Some(1450),
                ip_masq: true
            }
        );
        let mut v = ferrynet_conf("1.1.0");
        v["mtu"] = json!("big");
        let c = NetConf::parse(&conf_bytes(&v)).unwrap();
        let e = c.plugin_config::<Ours>().unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("plugin configuration"));
    }

    fn parse_err(bytes: &[u8]) -> CniError {
        NetConf::parse(bytes).unwrap_err()
    }

    #[test]
    fn conf_errors_have_spec_codes() {
        // Not JSON / not an object: decode failure.
        assert_eq!(parse_err(b"").code, 6);
        assert_eq!(parse_err(b"{\"cniVersion\":").code, 6);
        assert_eq!(parse_err(b"[1,2]").code, 6);
        assert_eq!(parse_err(b"\"conf\"").code, 6);
        // Missing, empty or mistyped required keys: invalid config naming the key.
        for key in ["cniVersion", "name", "type"] {
            let mut v = ferrynet_conf("1.0.0");
            v.as_object_mut().unwrap().remove(key);
            let e = parse_err(&conf_bytes(&v));
            assert_eq!(e.code, 7, "{e}");
            assert!(e.msg.contains(key), "{}", e.msg);
            for bad in [json!(""), json!(3), json!(null)] {
                v[key] = bad;
                let e = parse_err(&conf_bytes(&v));
                assert_eq!(e.code, 7, "{e}");
                assert!(e.msg.contains(key), "{}", e.msg);
            }
        }
        // Invalid network name.
        let e = parse_err(br#"{"cniVersion":"1.0.0","name":"-bad name","type":"t"}"#);
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("name"));
        // Unsupported version: incompatible, listing ours.
        for v in ["0.1.0", "0.2.0", "1.2.0", "1.0", "latest"] {
            let e = parse_err(&conf_bytes(&ferrynet_conf(v)));
            assert_eq!(e.code, 1, "{v}");
            assert!(
                e.msg.contains("1.1.0") && e.msg.contains("0.3.0"),
                "{}",
                e.msg
            );
        }
        // Known key with the wrong shape: decode failure.
        let mut v = ferrynet_conf("1.0.0");
        v["runtimeConfig"]["portMappings"][0]["hostPort"] = json!("eighty");
        assert_eq!(parse_err(&conf_bytes(&v)).code, 6);
        let mut v = ferrynet_conf("1.0.0");
        v["dns"] = json!(["8.8.8.8"]);
        assert_eq!(parse_err(&conf_bytes(&v)).code, 6);
        let mut v = ferrynet_conf("1.1.0");
        v["cni.dev/valid-attachments"] = json!([{"containerID": "c1"}]);
        assert_eq!(parse_err(&conf_bytes(&v)).code, 6);
        assert_eq!(NetConf::from_value(json!(1)).unwrap_err().code, 6);
    }

    /// The plugin config containerd 1.6 hands over for a pod with a host port, a bandwidth
    /// annotation and DNS settings: go-cni's structs carry no JSON tags.
    fn containerd_conf() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "ferry-net",
            "type": "ferrynet",
            "capabilities": {"portMappings": true, "bandwidth": true, "dns": true},
            "runtimeConfig": {
                "portMappings": [
                    {"HostPort": 18090, "ContainerPort": 8080, "Protocol": "tcp",
                     "HostIP": "127.0.0.1"},
                    {"HostPort": 18091, "ContainerPort": 53, "Protocol": "udp", "HostIP": ""}
                ],
                "bandwidth": {"IngressRate": 1000000, "IngressBurst": 4294967295u64,
                              "EgressRate": 2000000, "EgressBurst": 4294967295u64},
                "dns": {"Servers": ["10.96.0.10"], "Searches": ["default.svc.cluster.local"],
                        "Options": ["ndots:5"]},
                "ipRanges": [[{"Subnet": "10.22.0.0/16", "RangeStart": "10.22.0.10"}]],
                "ips": ["10.22.0.9"],
                "mac": "02:00:00:00:00:09"
            }
        })
    }

    #[test]
    fn decodes_containerd_shapes() {
        let c = NetConf::parse(&conf_bytes(&containerd_conf())).unwrap();
        let rc = &c.runtime_config;
        assert_eq!(
            rc.port_mappings,
            vec![
                PortMapping {
                    host_port: 18090,
                    container_port: 8080,
                    protocol: Protocol::Tcp,
                    host_ip: Some("127.0.0.1".parse().unwrap())
                },
                PortMapping {
                    host_port: 18091,
                    container_port: 53,
                    protocol: Protocol::Udp,
                    host_ip: None
                }
            ]
        );
        assert_eq!(
            rc.bandwidth,
            Some(Bandwidth {
                ingress_rate: 1_000_000,
                ingress_burst: u64::from(u32::MAX),
                egress_rate: 2_000_000,
                egress_burst: u64::from(u32::MAX),
            })
        );
        assert_eq!(
            rc.dns,
            Some(RuntimeDns {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            })
        );
        assert_eq!(rc.ip_ranges[0][0].subnet.to_string(), "10.22.0.0/16");
        assert_eq!(
            rc.ip_ranges[0][0].range_start,
            Some("10.22.0.10".parse().unwrap())
        );
        assert!(rc.extra.is_empty(), "{:?}", rc.extra);
        rc.validate(1500).unwrap();
        // Re-serialized in the canonical spelling, it decodes to the same thing.
        let again = NetConf::from_value(c.to_value()).unwrap();
        assert_eq!(again, c);
        assert_eq!(
            c.to_value()["runtimeConfig"]["portMappings"][0]["hostPort"],
            18090
        );
    }

    #[test]
    fn every_known_key_in_any_case() {
        let v = json!({
            "CNIVersion": "1.0.0", "NAME": "ferry-net", "Type": "ferrynet",
            "IPAM": {"Type": "host-local", "Subnet": "10.22.0.0/16",
                     "Ranges": [[{"SUBNET": "fd00:22::/64"}]]},
            "DNS": {"Nameservers": ["10.22.0.1"], "Search": ["x"]},
            "Subnets": [{"CIDR": "10.23.0.0/24"}],
            "Bridge": "fn-x", "MTU": 1400, "IPMasq": false, "StateDir": "/tmp/s",
            "RuntimeConfig": {"PortMappings": [{"hostport": 80, "CONTAINERPORT": 81}],
                              "MAC": "02:00:00:00:00:01", "IPs": ["10.22.0.5"]},
            "Unknown": {"Kept": 1}
        });
        let c = NetConf::parse(&conf_bytes(&v)).unwrap();
        assert_eq!(
            (c.cni_version.as_str(), c.name.as_str()),
            ("1.0.0", "ferry-net")
        );
        assert_eq!(c.type_, "ferrynet");
        assert_eq!(c.ipam_type(), Some("host-local"));
        let ipam = c.ipam.as_ref().unwrap();
        assert_eq!(ipam["subnet"], "10.22.0.0/16");
        assert_eq!(ipam["ranges"][0][0]["subnet"], "fd00:22::/64");
        assert_eq!(c.dns.as_ref().unwrap().nameservers, vec!["10.22.0.1"]);
        assert_eq!(c.extra["subnets"][0]["cidr"], "10.23.0.0/24");
        for key in ["bridge", "mtu", "ipMasq", "stateDir"] {
            assert!(c.extra.contains_key(key), "{key}: {:?}", c.extra);
        }
        // Unknown keys are kept as they are.
        assert_eq!(c.extra["Unknown"], json!({"Kept": 1}));
        let rc = &c.runtime_config;
        assert_eq!(
            (
                rc.port_mappings[0].host_port,
                rc.port_mappings[0].container_port
            ),
            (80, 81)
        );
        assert_eq!(rc.mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!(rc.ips, vec!["10.22.0.5"]);
        // Two spellings of one field: refused as ambiguous (code 6), naming both.
        let mut v = containerd_conf();
        v["runtimeConfig"]["portMappings"][0]["HOSTPORT"] = json!(1);
        let e = NetConf::parse(&conf_bytes(&v)).unwrap_err();
        assert_eq!(e.code, 6);
        assert!(
            e.msg.contains("HOSTPORT") && e.msg.contains("HostPort"),
            "{e}"
        );
    }

    #[test]
    fn zero_ports_are_invalid_config_before_anything_happens() {
        for (pm, key) in [
            (json!({"HostPort": 0, "ContainerPort": 80}), "hostPort"),
            (json!({"ContainerPort": 80}), "hostPort"),
            (
                json!({"HostPort": 8080, "ContainerPort": 0}),
                "containerPort",
            ),
            (json!({"HostPort": 8080}), "containerPort"),
        ] {
            let mut v = containerd_conf();
            v["runtimeConfig"]["portMappings"] = json!([pm]);
            // Decoding succeeds (as Go's does); the check refuses.
            let c = NetConf::parse(&conf_bytes(&v)).unwrap();
            let e = c.runtime_config.validate(1500).unwrap_err();
            assert_eq!(e.code, 7, "{e}");
            assert!(
                e.msg.contains(key) && e.msg.contains("portMappings[0]"),
                "{e}"
            );
        }
        let mut v = containerd_conf();
        v["runtimeConfig"]["portMappings"][0]["HostIP"] = json!("224.0.0.1");
        let c = NetConf::parse(&conf_bytes(&v)).unwrap();
        assert_eq!(c.runtime_config.validate(1500).unwrap_err().code, 7);
    }

    #[test]
    fn bad_bandwidth_is_invalid_config() {
        for bw in [
            json!({"IngressRate": 1000000}),
            json!({"EgressBurst": 1000000}),
            json!({"IngressRate": 4, "IngressBurst": 1000000}),
            json!({"EgressRate": 1000000, "EgressBurst": 40000000000u64}),
            json!({"IngressRate": 1000000, "IngressBurst": 800}),
        ] {
            let mut v = containerd_conf();
            v["runtimeConfig"]["bandwidth"] = bw.clone();
            let c = NetConf::parse(&conf_bytes(&v)).unwrap();
            let e = c.runtime_config.validate(1500).unwrap_err();
            assert_eq!(e.code, 7, "{bw}: {e}");
            assert!(e.msg.contains("bandwidth"), "{e}");
        }
        // Negative or fractional values are not numbers of the type: decode errors.
        let mut v = containerd_conf();
        v["runtimeConfig"]["bandwidth"] = json!({"IngressRate": -1, "IngressBurst": 1});
        assert_eq!(NetConf::parse(&conf_bytes(&v)).unwrap_err().code, 6);
    }

    #[test]
    fn any_address_spellings() {
        for (ip, want) in [
            ("", None),
            ("0.0.0.0", Some("0.0.0.0")),
            ("::", Some("::")),
            (" 10.0.0.1 ", Some("10.0.0.1")),
        ] {
            let mut v = containerd_conf();
            v["runtimeConfig"]["portMappings"][0]["HostIP"] = json!(ip);
            let c = NetConf::parse(&conf_bytes(&v)).unwrap();
            assert_eq!(
                c.runtime_config.port_mappings[0].host_ip,
                want.map(|w| w.parse().unwrap()),
                "{ip:?}"
            );
        }
    }

    #[test]
    fn bad_ips_capability_is_invalid_config() {
        for bad in ["10.0.0.300", "10.0.0.1/33", "fd00::1/129", "", "x/24"] {
            let rc = RuntimeConfig {
                ips: vec![bad.into()],
                ..Default::default()
            };
            assert_eq!(rc.parsed_ips().unwrap_err().code, 7, "{bad}");
        }
    }

    fn conflist() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "ferry-net",
            "disableCheck": true,
            "plugins": [
                {"type": "ferrynet", "bridge": "fn0", "ipam": {"type": "ferrynet-ipam"}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]
        })
    }

    #[test]
    fn parses_conflist_and_builds_plugin_confs() {
        let l = NetConfList::parse(&conf_bytes(&conflist())).unwrap();
        assert_eq!(l.name, "ferry-net");
        assert!(l.disable_check && !l.disable_gc);
        assert_eq!(l.plugins.len(), 2);
        assert_eq!(l.effective_version().unwrap(), "1.0.0");
        let p0 = l.plugin_conf(0).unwrap();
        assert_eq!(
            (p0.name.as_str(), p0.cni_version.as_str()),
            ("ferry-net", "1.0.0")
        );
        assert_eq!(p0.type_, "ferrynet");
        assert_eq!(p0.extra["bridge"], "fn0");
        let p1 = l.plugin_conf(1).unwrap();
        assert_eq!(p1.type_, "portmap");
        assert_eq!(p1.extra["snat"], true);
        assert_eq!(l.plugin_conf(2).unwrap_err().code, 7);
        // Serialized back, it is the same document.
        assert_eq!(serde_json::to_value(&l).unwrap(), conflist());
    }

    #[test]
    fn cni_versions_pick_highest_supported() {
        let mut v = conflist();
        v.as_object_mut().unwrap().remove("cniVersion");
        v["cniVersions"] = json!(["0.4.0", "1.1.0", "1.0.0", "2.0.0"]);
        v["disableGC"] = json!("true");
        v["loadOnlyInlinedPlugins"] = json!(true);
        let l = NetConfList::parse(&conf_bytes(&v)).unwrap();
        assert!(l.disable_gc && l.load_only_inlined_plugins);
        assert_eq!(l.effective_version().unwrap(), "1.1.0");
        assert_eq!(l.plugin_conf(1).unwrap().cni_version, "1.1.0");
        // cniVersions wins over cniVersion.
        v["cniVersion"] = json!("0.3.1");
        let l = NetConfList::parse(&conf_bytes(&v)).unwrap();
        assert_eq!(l.plugin_conf(0).unwrap().cni_version, "1.1.0");
        // Nothing supported in cniVersions, but cniVersion is: fall back to it.
        v["cniVersions"] = json!(["2.0.0"]);
        let l = NetConfList::parse(&conf_bytes(&v)).unwrap();
        assert_eq!(l.effective_version().unwrap(), "0.3.1");
        // Nothing supported at all.
        v.as_object_mut().unwrap().remove("cniVersion");
        let e = NetConfList::parse(&conf_bytes(&v)).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("2.0.0"));
    }

    #[test]
    fn conflist_errors() {
        let err = |v: &Value| NetConfList::parse(&conf_bytes(v)).unwrap_err();
        assert_eq!(NetConfList::parse(b"nope").unwrap_err().code, 6);
        assert_eq!(NetConfList::parse(b"[]").unwrap_err().code, 6);
        for key in ["name", "cniVersion", "plugins"] {
            let mut v = conflist();
            v.as_object_mut().unwrap().remove(key);
            let e = err(&v);
            assert_eq!(e.code, 7, "{e}");
            assert!(e.msg.contains(key), "{}", e.msg);
        }
        let mut v = conflist();
        v["plugins"] = json!([]);
        assert_eq!(err(&v).code, 7);
        v["plugins"] = json!({"type": "x"});
        assert_eq!(err(&v).code, 7);
        v["plugins"] = json!([{"type": "a"}, {"bridge": "x"}]);
        let e = err(&v);
        assert_eq!(e.code, 7);
        assert!(
            e.msg.contains("plugins[1]") && e.msg.contains("type"),
            "{}",
            e.msg
        );
        v["plugins"] = json!([5]);
        assert_eq!(err(&v).code, 7);
        let mut v = conflist();
        v["cniVersion"] = json!("0.2.0");
        assert_eq!(err(&v).code, 1);
        let mut v = conflist();
        v["disableCheck"] = json!("maybe");
        assert_eq!(err(&v).code, 6);
    }

    #[test]
    fn parse_any_wraps_single_conf() {
        let single = json!({"cniVersion": "0.4.0", "name": "solo", "type": "ferrynet",
                            "bridge": "fn1"});
        let l = NetConfList::parse_any(&conf_bytes(&single)).unwrap();
        assert_eq!(l.name, "solo");
        assert_eq!(l.plugins.len(), 1);
        let p = l.plugin_conf(0).unwrap();
        assert_eq!(p.cni_version, "0.4.0");
        assert_eq!(p.extra["bridge"], "fn1");
        let l = NetConfList::parse_any(&conf_bytes(&conflist())).unwrap();
        assert_eq!(l.plugins.len(), 2);
        let e = NetConfList::parse_any(br#"{"cniVersion":"1.0.0","name":"x"}"#).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("type"));
    }
}
