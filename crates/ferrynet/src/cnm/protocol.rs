//! The Docker plugin protocol's messages: `Plugin.Activate`, libnetwork's remote network driver
//! (`NetworkDriver.*`) and remote IPAM driver (`IpamDriver.*`). Field names are Docker's
//! (PascalCase). Every request field defaults when absent so that a missing field is reported
//! by the handler with a clear message instead of a decoding error.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Go encodes nil maps and slices as `null`: read that as empty.
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Docker's label for an endpoint's published ports (a list of [`PortBinding`]).
pub const PORTMAP: &str = "com.docker.network.portmap";
/// Docker's label holding `docker network create -o` options (a string map).
pub const GENERIC: &str = "com.docker.network.generic";
/// Docker's label for `--ipv6`.
pub const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
/// Docker's label for `--internal`.
pub const INTERNAL: &str = "com.docker.network.internal";
/// The `RequestAddress` option key naming the kind of address asked for.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
/// The `RequestAddressType` value of a gateway request.
pub const GATEWAY_TYPE: &str = "com.docker.network.gateway";

/// `Plugin.Activate` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ActivateResponse {
    /// The subsystems this plugin serves.
    pub implements: Vec<String>,
}

/// `NetworkDriver.GetCapabilities` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CapabilitiesResponse {
    /// Where the driver's data lives: `local` or `global`.
    pub scope: String,
    /// How far its networks reach: `local` or `global`.
    pub connectivity_scope: String,
}

/// Address pool data Docker passes with `CreateNetwork` and `AllocateNetwork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct IpamData {
    /// IPAM address space.
    pub address_space: String,
    /// The pool (CIDR).
    pub pool: String,
    /// The gateway with the pool's prefix length (`10.0.0.1/24`).
    pub gateway: String,
    /// Reserved auxiliary addresses by name (`ip/len`).
    #[serde(deserialize_with = "nullable")]
    pub aux_addresses: BTreeMap<String, String>,
}

/// `NetworkDriver.CreateNetwork` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateNetworkRequest {
    /// Docker's network id.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Options: `com.docker.network.generic` (the `-o` map), IPv6 and internal flags.
    #[serde(deserialize_with = "nullable")]
    pub options: BTreeMap<String, Value>,
    /// IPv4 pools.
    #[serde(rename = "IPv4Data", deserialize_with = "nullable")]
    pub ipv4_data: Vec<IpamData>,
    /// IPv6 pools.
    #[serde(rename = "IPv6Data", deserialize_with = "nullable")]
    pub ipv6_data: Vec<IpamData>,
}

/// A request naming only a network (`DeleteNetwork`, `FreeNetwork`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkRequest {
    /// Docker's network id.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

/// `NetworkDriver.AllocateNetwork` request (swarm managers only): the same fields as
/// `CreateNetwork`.
pub type AllocateNetworkRequest = CreateNetworkRequest;

/// `NetworkDriver.AllocateNetwork` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AllocateNetworkResponse {
    /// Driver state to hand to every node (none for a local-scope driver).
    #[serde(deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
}

/// An endpoint's interface as Docker and the driver exchange it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointInterface {
    /// IPv4 address with prefix length, or empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// IPv6 address with prefix length, or empty.
    #[serde(rename = "AddressIPv6", skip_serializing_if = "String::is_empty")]
    pub address_ipv6: String,
    /// MAC address, or empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

/// `NetworkDriver.CreateEndpoint` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateEndpointRequest {
    /// Docker's network id.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's endpoint id.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// The addresses Docker's IPAM chose (and a MAC if the user set one).
    pub interface: Option<EndpointInterface>,
    /// Endpoint options.
    #[serde(deserialize_with = "nullable")]
    pub options: BTreeMap<String, Value>,
}

/// `NetworkDriver.CreateEndpoint` answer: only the fields the driver chose itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointResponse {
    /// Fields Docker left empty that the driver filled in; None when there were none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<EndpointInterface>,
}

/// A request naming a network and an endpoint (`DeleteEndpoint`, `EndpointOperInfo`, `Leave`,
/// `RevokeExternalConnectivity`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointRequest {
    /// Docker's network id.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's endpoint id.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

/// `NetworkDriver.EndpointOperInfo` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInfoResponse {
    /// Free-form operational data.
    pub value: BTreeMap<String, Value>,
}

/// `NetworkDriver.Join` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct JoinRequest {
    /// Docker's network id.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's endpoint id.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// Path of the container's network namespace.
    pub sandbox_key: String,
    /// Sandbox options.
    #[serde(deserialize_with = "nullable")]
    pub options: BTreeMap<String, Value>,
}

/// The link Docker moves into the container and the name prefix it renames it to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    /// Name of the link in the host namespace.
    pub src_name: String,
    /// Prefix of its name in the container (Docker appends a number).
    pub dst_prefix: String,
}

/// A route Docker installs in the container.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct StaticRoute {
    /// Destination prefix.
    pub destination: String,
    /// 0: via a next hop, 1: directly connected.
    pub route_type: u8,
    /// Next hop address (empty when connected).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub next_hop: String,
}

/// `NetworkDriver.Join` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct JoinResponse {
    /// The link to move into the container.
    pub interface_name: InterfaceName,
    /// IPv4 default gateway (empty: none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// IPv6 default gateway (empty: none).
    #[serde(rename = "GatewayIPv6", skip_serializing_if = "String::is_empty")]
    pub gateway_ipv6: String,
    /// Extra routes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub static_routes: Vec<StaticRoute>,
    /// Tell Docker not to add a gateway network of its own for this container.
    pub disable_gateway_service: bool,
}

/// `NetworkDriver.ProgramExternalConnectivity` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct ProgramExternalRequest {
    /// Docker's network id.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's endpoint id.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// Sandbox options, holding the port bindings.
    #[serde(deserialize_with = "nullable")]
    pub options: BTreeMap<String, Value>,
}

/// A published port as Docker describes it (`-p [HOSTIP:]HOSTPORT[-END]:PORT/PROTO`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct PortBinding {
    /// IP protocol number: 6 TCP, 17 UDP, 132 SCTP.
    pub proto: u8,
    /// Container address (empty: the endpoint's).
    #[serde(rename = "IP")]
    pub ip: String,
    /// Container port.
    pub port: u16,
    /// Host address (empty or unspecified: every address).
    #[serde(rename = "HostIP")]
    pub host_ip: String,
    /// Host port (0: pick one).
    pub host_port: u16,
    /// Last host port of a range to pick from (0 or equal to `host_port`: exactly that port).
    pub host_port_end: u16,
}

/// `IpamDriver.GetCapabilities` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct IpamCapabilitiesResponse {
    /// Whether `RequestAddress` needs the endpoint's MAC.
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    /// Whether Docker must replay pool and address requests after a restart.
    pub requires_request_replay: bool,
}

/// `IpamDriver.GetDefaultAddressSpaces` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AddressSpacesResponse {
    /// Address space of local-scope networks.
    pub local_default_address_space: String,
    /// Address space of global-scope networks.
    pub global_default_address_space: String,
}

/// `IpamDriver.RequestPool` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestPoolRequest {
    /// Address space.
    pub address_space: String,
    /// Wanted pool (CIDR), empty: pick one.
    pub pool: String,
    /// Sub-range containers get addresses from (`--ip-range`), empty: the whole pool.
    pub sub_pool: String,
    /// `--ipam-opt` options.
    #[serde(deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
    /// An IPv6 pool is asked for.
    #[serde(rename = "V6")]
    pub v6: bool,
}

/// `IpamDriver.RequestPool` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPoolResponse {
    /// Opaque id Docker passes back in later calls.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// The pool (CIDR).
    pub pool: String,
    /// Extra data.
    pub data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleasePool` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct ReleasePoolRequest {
    /// The pool's id.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

/// `IpamDriver.RequestAddress` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestAddressRequest {
    /// The pool's id.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// Wanted address (no prefix), empty: the next free one.
    pub address: String,
    /// Options, e.g. `RequestAddressType: com.docker.network.gateway`.
    #[serde(deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
}

/// `IpamDriver.RequestAddress` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddressResponse {
    /// The address with the pool's prefix length.
    pub address: String,
    /// Extra data.
    pub data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleaseAddress` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct ReleaseAddressRequest {
    /// The pool's id.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// The address (no prefix).
    pub address: String,
}

/// An empty success answer (`{}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_network_request_as_docker_sends_it() {
        let body = r#"{"NetworkID":"abc","Options":{"com.docker.network.enable_ipv6":false,
            "com.docker.network.generic":{"com.docker.network.driver.mtu":"1400"}},
            "IPv4Data":[{"AddressSpace":"ferrynet-local","Gateway":"10.9.0.1/24","Pool":"10.9.0.0/24"}],
            "IPv6Data":[]}"#;
        let r: CreateNetworkRequest = serde_json::from_str(body).unwrap();
        assert_eq!(r.network_id, "abc");
        assert_eq!(r.ipv4_data[0].pool, "10.9.0.0/24");
        assert_eq!(r.ipv4_data[0].gateway, "10.9.0.1/24");
        assert!(r.ipv4_data[0].aux_addresses.is_empty());
        assert_eq!(r.options[GENERIC]["com.docker.network.driver.mtu"], "1400");
    }

    #[test]
    fn missing_fields_default_and_wrong_types_fail() {
        let r: EndpointRequest = serde_json::from_str("{}").unwrap();
        assert!(r.network_id.is_empty());
        // Go's nil maps and slices arrive as null.
        let r: RequestAddressRequest =
            serde_json::from_str(r#"{"PoolID":"p","Address":"","Options":null}"#).unwrap();
        assert!(r.options.is_empty());
        let r: CreateNetworkRequest = serde_json::from_str(
            r#"{"NetworkID":"n","Options":null,"IPv4Data":null,"IPv6Data":null}"#,
        )
        .unwrap();
        assert!(r.ipv4_data.is_empty() && r.options.is_empty());
        assert!(serde_json::from_str::<EndpointRequest>(r#"{"NetworkID":5}"#).is_err());
        assert!(serde_json::from_str::<RequestPoolRequest>(r#"{"V6":"yes"}"#).is_err());
    }

    #[test]
    fn port_binding_and_join_shapes() {
        let b: PortBinding = serde_json::from_str(
            r#"{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}"#,
        )
        .unwrap();
        assert_eq!((b.proto, b.port, b.host_port), (6, 80, 8080));
        let j = JoinResponse {
            interface_name: InterfaceName {
                src_name: "fnp1".into(),
                dst_prefix: "eth".into(),
            },
            gateway: "10.0.0.1".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["InterfaceName"]["SrcName"], "fnp1");
        assert_eq!(v["InterfaceName"]["DstPrefix"], "eth");
        assert_eq!(v["Gateway"], "10.0.0.1");
        assert!(v.get("GatewayIPv6").is_none());
        let c = CreateEndpointResponse {
            interface: Some(EndpointInterface {
                mac_address: "02:00:00:00:00:01".into(),
                ..Default::default()
            }),
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"Interface":{"MacAddress":"02:00:00:00:00:01"}}"#
        );
        let caps = IpamCapabilitiesResponse::default();
        assert_eq!(
            serde_json::to_string(&caps).unwrap(),
            r#"{"RequiresMACAddress":false,"RequiresRequestReplay":false}"#
        );
    }
}
