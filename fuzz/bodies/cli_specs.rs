//! The CLI's small languages: `-p` publish specs and `--check` health checks. The first byte
//! picks the parser.
use ferrynet::cli::service::parse_check;
use ferrynet::container::parse_publish;

/// One input: an error or a value, never a panic (nor a broken invariant).
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    if which & 1 == 0 {
        if let Ok(ms) = parse_publish(s) {
            // A range is one mapping per port, never more than 65,536.
            assert!(ms.len() <= 65_536);
        }
    } else {
        let _ = parse_check(s);
    }
}
