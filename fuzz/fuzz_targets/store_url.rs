//! The store URL (`--store`, `host.json`): any string is a config or an error, and a config
//! prints back (with its password hidden) without panicking.
#![no_main]

use ferrynet_store::StoreConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = StoreConfig::parse(s) {
            let _ = c.to_string();
        }
    }
});
