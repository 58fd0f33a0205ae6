//! The CNI error result: a well-known code, a message and optional details.

use serde_json::{json, Value};

/// A CNI error as the spec defines it; the plugin prints it via [`CniError::to_json`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", details_suffix(details))]
pub struct CniError {
    /// Well-known code (1–99 reserved by the spec) or plugin-specific (100+).
    pub code: u32,
    /// Short message describing the error.
    pub msg: String,
    /// Longer detail; omitted from JSON when empty.
    pub details: String,
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

impl CniError {
    /// Code 1: incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Code 2: unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Code 3: container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Code 4: invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Code 5: I/O failure.
    pub const IO: u32 = 5;
    /// Code 6: failed to decode content.
    pub const DECODE: u32 = 6;
    /// Code 7: invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Code 11: try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Code 50: the plugin is not available (STATUS).
    pub const NOT_AVAILABLE: u32 = 50;
    /// Code 51: not available, existing containers may have limited connectivity (STATUS).
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// Lowest code a plugin may define itself.
    pub const FIRST_PLUGIN_CODE: u32 = 100;

    /// An error with the given code and message and no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Returns the error with `details` set.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Code 1 for a configuration whose `cniVersion` we do not speak; lists what we do.
    pub fn incompatible_version(requested: &str) -> Self {
        Self::new(
            Self::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI version {requested:?}; supported versions: {}",
                super::SUPPORTED_VERSIONS.join(", ")
            ),
        )
    }

    /// Code 2 naming the unsupported key and value.
    pub fn unsupported_field(key: &str, value: impl std::fmt::Display) -> Self {
        Self::new(
            Self::UNSUPPORTED_FIELD,
            format!("unsupported field {key:?} with value {value}"),
        )
    }

    /// Code 3: the container is unknown (the runtime need not call DEL).
    pub fn unknown_container(msg: impl Into<String>) -> Self {
        Self::new(Self::UNKNOWN_CONTAINER, msg)
    }

    /// Code 4: a required environment variable is missing or invalid; name it in `msg`.
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(Self::INVALID_ENV, msg)
    }

    /// Code 5: an I/O failure.
    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(Self::IO, msg)
    }

    /// Code 6: content could not be decoded.
    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(Self::DECODE, msg)
    }

    /// Code 7: the network configuration is invalid.
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(Self::INVALID_CONFIG, msg)
    }

    /// Code 11: transient condition; the runtime should retry later.
    pub fn try_again_later(msg: impl Into<String>) -> Self {
        Self::new(Self::TRY_AGAIN_LATER, msg)
    }

    /// Code 50 (STATUS): the plugin cannot service ADD requests.
    pub fn not_available(msg: impl Into<String>) -> Self {
        Self::new(Self::NOT_AVAILABLE, msg)
    }

    /// Code 51 (STATUS): not available, and existing containers may have limited connectivity.
    pub fn limited_connectivity(msg: impl Into<String>) -> Self {
        Self::new(Self::LIMITED_CONNECTIVITY, msg)
    }

    /// A plugin-specific error; codes below 100 are reserved by the spec and are raised to 100.
    pub fn plugin(code: u32, msg: impl Into<String>) -> Self {
        Self::new(code.max(Self::FIRST_PLUGIN_CODE), msg)
    }

    /// The error result document for stdout, in the given CNI version.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_use_spec_codes() {
        assert_eq!(CniError::incompatible_version("0.2.0").code, 1);
        assert_eq!(CniError::unsupported_field("mode", "vxlan").code, 2);
        assert_eq!(CniError::unknown_container("x").code, 3);
        assert_eq!(CniError::invalid_env("x").code, 4);
        assert_eq!(CniError::io("x").code, 5);
        assert_eq!(CniError::decode("x").code, 6);
        assert_eq!(CniError::invalid_config("x").code, 7);
        assert_eq!(CniError::try_again_later("x").code, 11);
        assert_eq!(CniError::not_available("x").code, 50);
        assert_eq!(CniError::limited_connectivity("x").code, 51);
        assert_eq!(CniError::plugin(123, "x").code, 123);
        assert_eq!(CniError::plugin(7, "x").code, 100);
    }

    #[test]
    fn messages_name_their_subject() {
        let e = CniError::incompatible_version("0.2.0");
        assert!(e.msg.contains("0.2.0"));
        assert!(e.msg.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"));
        let e = CniError::unsupported_field("mode", "vxlan");
        assert!(e.msg.contains("\"mode\"") && e.msg.contains("vxlan"));
    }

    #[test]
    fn json_omits_empty_details() {
        let e = CniError::invalid_config("bad subnet");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad subnet"})
        );
        let e = e.with_details("10.0.0.0/33 is not a CIDR");
        assert_eq!(
            e.to_json("1.1.0"),
            json!({"cniVersion": "1.1.0", "code": 7, "msg": "bad subnet",
                   "details": "10.0.0.0/33 is not a CIDR"})
        );
    }

    #[test]
    fn display_includes_code_msg_and_details() {
        let e = CniError::io("open failed");
        assert_eq!(e.to_string(), "CNI error 5: open failed");
        let e = e.with_details("ENOENT");
        assert_eq!(e.to_string(), "CNI error 5: open failed (ENOENT)");
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(boxed.to_string().contains("ENOENT"));
    }
}
