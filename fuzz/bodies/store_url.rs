//! The store URL (`--store`, `host.json`): any string is a config or an error, and a config
//! prints back (with its password hidden) without panicking.
use ferrynet_store::StoreConfig;

/// One input: an error or a value, never a panic (nor a broken invariant).
pub fn run(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = StoreConfig::parse(s) {
            let _ = c.to_string();
        }
    }
}
