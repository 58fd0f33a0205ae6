//! How the sleeve reaches one peer: directly at one of its endpoints, or relayed through a
//! third peer both reach (two hosts each behind its own NAT see neither the other's private
//! address nor an open port on its router; Weave's sleeve relays the same way). Pure: the
//! ways to try and in which order, which one comes next, what a relay may forward, and the
//! sentence `ferrynet status` shows.
//!
//! The relay never holds a session with the two ends' traffic: the WireGuard session is end to
//! end, the relay forwards its datagrams inside a 12-byte envelope (below) and sees only who
//! talks to whom, when, and how much.

use std::net::SocketAddr;

use super::SleevePeer;

/// The first byte of a datagram a peer asks a relay to forward: `[5, 0, 0, 0]`, then the first
/// [`KEY_PREFIX`] bytes of the destination's public key, then the WireGuard message. Never a
/// WireGuard message (types 1-4) nor a probe (`FNPROBE1`).
pub const RELAY_FORWARD: u8 = 5;
/// The first byte of a datagram a relay forwarded: `[6, 0, 0, 0]`, then the first
/// [`KEY_PREFIX`] bytes of the sender's public key (as the relay knows it), then the message.
pub const RELAY_FORWARDED: u8 = 6;
/// Bytes of a public key naming a peer in the envelope (64 bits: no two registered keys share
/// them but by a collision no one can aim at without breaking X25519).
pub const KEY_PREFIX: usize = 8;
/// The envelope's size: type, three zero bytes, the key prefix.
pub const RELAY_HEADER: usize = 4 + KEY_PREFIX;

/// One way to reach a peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathCandidate {
    /// Straight to this endpoint.
    Direct(SocketAddr),
    /// Through this peer (by host name), which forwards to the peer's endpoint it knows.
    Relay(String),
}

/// The ways to try for `target`, in order: its registered endpoints (as given, IPv4 first),
/// then each other peer of `peers` as a relay, by name. A relayed path is only worth its
/// detour when no direct one answers, so relays come last.
pub fn candidates(target: &SleevePeer, peers: &[SleevePeer]) -> Vec<PathCandidate> {
    let mut out: Vec<PathCandidate> = target
        .endpoints
        .iter()
        .copied()
        .map(PathCandidate::Direct)
        .collect();
    let mut relays: Vec<&str> = peers
        .iter()
        .filter(|p| p.host != target.host && p.public_key != target.public_key)
        .map(|p| p.host.as_str())
        .collect();
    relays.sort_unstable();
    relays.dedup();
    out.extend(
        relays
            .into_iter()
            .map(|h| PathCandidate::Relay(h.to_string())),
    );
    out
}

/// The candidate to try after `cursor` (wrapping): the next direct endpoint, or the next relay
/// this host can use now (`usable`: it reaches that peer directly with a live session; a relay
/// reached only through another relay would make chains and loops). `cursor` itself when
/// nothing else is usable; None when there are no candidates.
pub fn next(
    cands: &[PathCandidate],
    cursor: usize,
    usable: impl Fn(&str) -> bool,
) -> Option<usize> {
    let n = cands.len();
    if n == 0 {
        return None;
    }
    (1..=n)
        .map(|step| (cursor + step) % n)
        .find(|&i| match &cands[i] {
            PathCandidate::Direct(_) => true,
            PathCandidate::Relay(h) => usable(h),
        })
        .or(Some(cursor % n))
}

/// Why a relay refuses to forward a datagram (each counted as `relayRefused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayRefusal {
    /// The sender's address is not where this host hears a peer directly (anyone else would
    /// use the relay to reach hosts behind NAT).
    UnknownSender,
    /// No registered peer has the destination's key prefix.
    UnknownDestination,
    /// This host reaches the destination only through a relay itself, or not at all.
    NoDirectPath,
    /// Sender and destination are the same peer.
    Loop,
}

/// What a relay does with a forward request: `sender` is the peer heard directly at the
/// datagram's source address, `dst` the peer with the envelope's key prefix and whether this
/// host reaches it directly; forward only between two different peers both reached directly.
pub fn relay_verdict(sender: Option<&str>, dst: Option<(&str, bool)>) -> Result<(), RelayRefusal> {
    let sender = sender.ok_or(RelayRefusal::UnknownSender)?;
    let (dst, direct) = dst.ok_or(RelayRefusal::UnknownDestination)?;
    if dst == sender {
        return Err(RelayRefusal::Loop);
    }
    if !direct {
        return Err(RelayRefusal::NoDirectPath);
    }
    Ok(())
}

/// What the datapath knows of its way to a peer, for [`reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathView {
    /// Authenticated packets arrive from this endpoint; `registered`: it is one the peer
    /// registered (else a NAT's, learned).
    Direct {
        /// Where.
        endpoint: SocketAddr,
        /// Whether the peer registered it.
        registered: bool,
    },
    /// Authenticated packets arrive relayed by `via` (a host name, None: a relay this host
    /// does not hear directly any more).
    Relayed {
        /// The relay.
        via: Option<String>,
        /// Whether this host itself went through every direct endpoint unanswered first (else
        /// the peer chose the relay and this host answers the way it came).
        direct_failed: bool,
    },
    /// Nothing heard yet; a handshake is tried on this candidate.
    Trying(PathCandidate),
    /// No way to try (no endpoints and no relays).
    Unreachable,
}

/// The sentence `ferrynet status` shows for a peer's path.
pub fn reason(view: &PathView, endpoints: &[SocketAddr]) -> String {
    let list = || {
        endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match view {
        PathView::Direct {
            endpoint,
            registered: true,
        } => format!("direct to {endpoint}"),
        PathView::Direct { endpoint, .. } => {
            format!("direct to {endpoint}, learned from its packets (it is behind NAT or moved)")
        }
        PathView::Relayed { via, direct_failed } => {
            let via = via.as_deref().unwrap_or("a relay no longer heard directly");
            if *direct_failed {
                format!("relayed through {via}: no answer at its endpoints ({}); end-to-end encrypted, the relay forwards ciphertext", list())
            } else {
                format!("relayed through {via}: its packets arrive that way (it found no direct path to us); end-to-end encrypted, the relay forwards ciphertext")
            }
        }
        PathView::Trying(PathCandidate::Direct(e)) => format!("handshaking directly with {e}"),
        PathView::Trying(PathCandidate::Relay(h)) => format!(
            "handshaking through relay {h}: no answer at its endpoints ({})",
            list()
        ),
        PathView::Unreachable => "no endpoint registered and no relay".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(host: &str, key: u8, endpoints: &[&str]) -> SleevePeer {
        SleevePeer {
            host: host.into(),
            public_key: [key; 32],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            allowed: vec![],
        }
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_first_then_every_other_peer_as_relay() {
        let h3 = peer("h3", 3, &["172.30.3.2:6784", "[fd30:3::2]:6784"]);
        let peers = [
            peer("h4", 4, &[]),
            h3.clone(),
            peer("h1", 1, &["172.31.0.1:6784"]),
        ];
        assert_eq!(
            candidates(&h3, &peers),
            vec![
                PathCandidate::Direct(ep("172.30.3.2:6784")),
                PathCandidate::Direct(ep("[fd30:3::2]:6784")),
                PathCandidate::Relay("h1".into()),
                PathCandidate::Relay("h4".into()),
            ]
        );
        // A lone peer has only its endpoints; one without endpoints only relays.
        assert_eq!(candidates(&h3, std::slice::from_ref(&h3)).len(), 2);
        let bare = peer("h5", 5, &[]);
        assert_eq!(
            candidates(&bare, &peers),
            ["h1", "h3", "h4"].map(|h| PathCandidate::Relay(h.into()))
        );
    }

    #[test]
    fn next_skips_relays_not_reached_directly_and_wraps() {
        let c = vec![
            PathCandidate::Direct(ep("172.30.3.2:6784")),
            PathCandidate::Direct(ep("[fd30:3::2]:6784")),
            PathCandidate::Relay("h1".into()),
            PathCandidate::Relay("h4".into()),
        ];
        let only_h4 = |h: &str| h == "h4";
        assert_eq!(next(&c, 0, only_h4), Some(1));
        assert_eq!(next(&c, 1, only_h4), Some(3), "h1 is skipped");
        assert_eq!(next(&c, 3, only_h4), Some(0), "back to the endpoints");
        assert_eq!(next(&c, 1, |_| false), Some(0));
        // Only unusable relays: stay.
        let relays = &c[2..];
        assert_eq!(next(relays, 0, |_| false), Some(0));
        assert_eq!(next(relays, 0, |_| true), Some(1));
        assert_eq!(next(&[], 0, |_| true), None);
    }

    #[test]
    fn a_relay_forwards_only_between_two_peers_it_reaches_directly() {
        assert_eq!(relay_verdict(Some("h2"), Some(("h3", true))), Ok(()));
        assert_eq!(
            relay_verdict(None, Some(("h3", true))),
            Err(RelayRefusal::UnknownSender)
        );
        assert_eq!(
            relay_verdict(Some("h2"), None),
            Err(RelayRefusal::UnknownDestination)
        );
        assert_eq!(
            relay_verdict(Some("h2"), Some(("h3", false))),
            Err(RelayRefusal::NoDirectPath)
        );
        assert_eq!(
            relay_verdict(Some("h2"), Some(("h2", true))),
            Err(RelayRefusal::Loop)
        );
    }

    #[test]
    fn reasons_name_the_path_and_why() {
        let eps = [ep("172.30.3.2:6784")];
        let r = reason(
            &PathView::Relayed {
                via: Some("h1".into()),
                direct_failed: true,
            },
            &eps,
        );
        assert!(
            r.starts_with("relayed through h1: no answer at its endpoints (172.30.3.2:6784)"),
            "{r}"
        );
        let r = reason(
            &PathView::Relayed {
                via: Some("h1".into()),
                direct_failed: false,
            },
            &eps,
        );
        assert!(r.contains("it found no direct path"), "{r}");
        let r = reason(
            &PathView::Direct {
                endpoint: ep("172.31.0.103:6784"),
                registered: false,
            },
            &eps,
        );
        assert!(r.contains("behind NAT"), "{r}");
        assert_eq!(
            reason(
                &PathView::Direct {
                    endpoint: eps[0],
                    registered: true
                },
                &eps
            ),
            "direct to 172.30.3.2:6784"
        );
        assert!(
            reason(&PathView::Trying(PathCandidate::Relay("h4".into())), &eps).contains("relay h4")
        );
    }
}
