//! CNI specification versions: which we speak and how they order.

use std::cmp::Ordering;

use serde_json::{json, Value};

/// The CNI spec versions this plugin accepts and can answer in, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest CNI spec version we implement.
pub const LATEST_VERSION: &str = "1.1.0";

/// Whether `version` is one of [`SUPPORTED_VERSIONS`] (exact match, as the spec requires).
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Parses `X[.Y[.Z]]` into numbers; missing parts count as 0, anything else is invalid.
fn parse(version: &str) -> Option<(u64, u64, u64)> {
    let mut parts = version.trim().split('.');
    let mut next = |required: bool| -> Option<u64> {
        match parts.next() {
            Some(p) => p.parse().ok(),
            None if required => None,
            None => Some(0),
        }
    };
    let v = (next(true)?, next(false)?, next(false)?);
    if parts.next().is_some() {
        return None;
    }
    Some(v)
}

/// Orders two semantic versions numerically ("0.10.0" > "0.9.0").
///
/// Unparseable versions sort below every valid one (and among themselves by
/// their text), so they never win a "highest version" pick.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => a.cmp(b),
    }
}

/// The highest version in `list` that we support, if any (the 1.1 `cniVersions` rule).
pub fn highest_supported<S: AsRef<str>>(list: &[S]) -> Option<String> {
    list.iter()
        .map(AsRef::as_ref)
        .filter(|v| is_supported(v))
        .max_by(|a, b| compare_versions(a, b))
        .map(str::to_owned)
}

/// The VERSION command's answer; echoes the requested version, or the latest when none was given.
pub fn version_result(cni_version_requested: &str) -> Value {
    let v = cni_version_requested.trim();
    let v = if v.is_empty() { LATEST_VERSION } else { v };
    json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_numerically() {
        assert_eq!(compare_versions("0.4.0", "1.0.0"), Ordering::Less);
        assert_eq!(compare_versions("1.1.0", "1.0.0"), Ordering::Greater);
        assert_eq!(compare_versions("0.10.0", "0.9.0"), Ordering::Greater);
        assert_eq!(compare_versions("1.0", "1.0.0"), Ordering::Equal);
        assert_eq!(compare_versions("0.3.1", "0.3.0"), Ordering::Greater);
    }

    #[test]
    fn invalid_versions_sort_lowest() {
        assert_eq!(compare_versions("garbage", "0.0.1"), Ordering::Less);
        assert_eq!(compare_versions("0.0.1", "1.x"), Ordering::Greater);
        assert_eq!(compare_versions("1.0.0.0", "0.1.0"), Ordering::Less);
        assert_eq!(compare_versions("", ""), Ordering::Equal);
    }

    #[test]
    fn highest_supported_skips_unknown() {
        assert_eq!(
            highest_supported(&["0.4.0", "1.0.0", "2.0.0", "0.3.1"]),
            Some("1.0.0".to_owned())
        );
        assert_eq!(
            highest_supported(&["1.1.0".to_owned(), "0.3.0".to_owned()]),
            Some("1.1.0".to_owned())
        );
        assert_eq!(highest_supported(&["0.2.0", "9.9.9"]), None);
        assert_eq!(highest_supported::<&str>(&[]), None);
    }

    #[test]
    fn supported_set_is_exact() {
        for v in SUPPORTED_VERSIONS {
            assert!(is_supported(v));
        }
        assert!(!is_supported("0.2.0"));
        assert!(!is_supported("1.1"));
        assert!(!is_supported("1.2.0"));
    }

    #[test]
    fn version_result_shape() {
        assert_eq!(
            version_result("1.0.0"),
            json!({"cniVersion": "1.0.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
        assert_eq!(version_result("")["cniVersion"], "1.1.0");
    }
}
