//! The Docker plugin's request decoding, for every method: the first byte picks the method,
//! the rest is the body. Any body is an error or a request, never a panic.
use ferrynet::cnm::server::decode_request;

const METHODS: &[&str] = &[
    "Plugin.Activate",
    "NetworkDriver.GetCapabilities",
    "NetworkDriver.CreateNetwork",
    "NetworkDriver.DeleteNetwork",
    "NetworkDriver.AllocateNetwork",
    "NetworkDriver.FreeNetwork",
    "NetworkDriver.CreateEndpoint",
    "NetworkDriver.EndpointOperInfo",
    "NetworkDriver.DeleteEndpoint",
    "NetworkDriver.Join",
    "NetworkDriver.Leave",
    "NetworkDriver.DiscoverNew",
    "NetworkDriver.DiscoverDelete",
    "NetworkDriver.ProgramExternalConnectivity",
    "NetworkDriver.RevokeExternalConnectivity",
    "IpamDriver.GetCapabilities",
    "IpamDriver.GetDefaultAddressSpaces",
    "IpamDriver.RequestPool",
    "IpamDriver.ReleasePool",
    "IpamDriver.RequestAddress",
    "IpamDriver.ReleaseAddress",
    "Unknown.Method",
];

/// One input: an error or a value, never a panic (nor a broken invariant).
pub fn run(data: &[u8]) {
    let Some((&m, body)) = data.split_first() else {
        return;
    };
    let _ = decode_request(METHODS[m as usize % METHODS.len()], body);
}
