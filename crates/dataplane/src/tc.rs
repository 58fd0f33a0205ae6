//! Traffic shaping through rtnetlink: the `bandwidth` capability's token buckets
//! (`ferrynet_model::bandwidth`) on the host end of a container's veth and on its IFB device.
//!
//! Traffic to the container leaves the host end: a `tbf` qdisc at its root limits it. Traffic
//! from the container enters the host end: an `ingress` qdisc there with a u32 match-all filter
//! whose `mirred egress redirect` action sends every frame to an IFB device, and a `tbf` at the
//! IFB's root limits it; the IFB hands the frame back to the host end's receive path. Everything
//! lives in the host namespace, out of the container's reach.
//!
//! netlink-packet-route 0.34 has the ingress qdisc, the u32 filter and the mirred action, but no
//! `tbf` qdisc type: [`tbf_options`] encodes its attributes (`struct tc_tbf_qopt`, the burst and
//! the 64-bit rate) as raw netlink attributes, from linux/pkt_sched.h.

use ferrynet_model::bandwidth::{Shaping, TokenBucket};
use futures::StreamExt;
use rtnetlink::packet_core::DefaultNla;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::LinkIfb;

use crate::error::{errno, nl, DataplaneError, Result};
use crate::netlink::Netlink;

/// `TCA_TBF_PARMS`: `struct tc_tbf_qopt`.
pub const TCA_TBF_PARMS: u16 = 1;
/// `TCA_TBF_RATE64`: the rate in bytes/s when it does not fit the 32-bit field.
pub const TCA_TBF_RATE64: u16 = 4;
/// `TCA_TBF_BURST`: the bucket in bytes (the kernel derives the buffer time from it).
pub const TCA_TBF_BURST: u16 = 6;
/// `TC_LINKLAYER_ETHERNET`: rates count plain bytes, and the kernel needs no rate table.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// `ETH_P_ALL`: the filter sees every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// Priority of the redirect filter.
const FILTER_PRIORITY: u16 = 1;

const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const EINVAL: i32 = 22;

/// `struct tc_ratespec` (12 bytes) for `rate` bytes/s: linklayer Ethernet, no overhead.
fn ratespec(rate_bytes: u64) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[1] = TC_LINKLAYER_ETHERNET;
    // 64-bit rates go in TCA_TBF_RATE64; the 32-bit field then says "see there" (~0).
    let rate32 = u32::try_from(rate_bytes).unwrap_or(u32::MAX);
    r[8..12].copy_from_slice(&rate32.to_ne_bytes());
    r
}

/// The `TCA_OPTIONS` attributes of a `tbf` qdisc for `b`: `TCA_TBF_PARMS` (`struct
/// tc_tbf_qopt`: rate, no peak rate, limit, buffer, mtu 0), `TCA_TBF_BURST`, and
/// `TCA_TBF_RATE64` when the rate needs 64 bits; values in the host's byte order.
pub fn tbf_options(b: &TokenBucket) -> Vec<(u16, Vec<u8>)> {
    let mut qopt = Vec::with_capacity(36);
    qopt.extend_from_slice(&ratespec(b.rate_bytes));
    qopt.extend_from_slice(&[0u8; 12]); // peak rate: none
    qopt.extend_from_slice(&b.limit_bytes.to_ne_bytes());
    qopt.extend_from_slice(&b.buffer_ticks.to_ne_bytes());
    qopt.extend_from_slice(&0u32.to_ne_bytes()); // mtu: only used with a peak rate
    let mut out = vec![
        (TCA_TBF_PARMS, qopt),
        (TCA_TBF_BURST, b.burst_bytes.to_ne_bytes().to_vec()),
    ];
    if b.rate_bytes > u64::from(u32::MAX) {
        out.push((TCA_TBF_RATE64, b.rate_bytes.to_ne_bytes().to_vec()));
    }
    out
}

/// Send one tc request and wait for its acknowledgement.
async fn request(nl_: &Netlink, msg: RouteNetlinkMessage, flags: u16, what: &str) -> Result<()> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut handle = nl_.handle.clone();
    let mut resp = handle.request(req).map_err(nl(what.to_string()))?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload {
            if e.code.is_some() {
                return Err(DataplaneError::Netlink {
                    op: what.to_string(),
                    source: rtnetlink::Error::NetlinkError(e),
                });
            }
        }
    }
    Ok(())
}

/// Replace the root qdisc of link `index` with a `tbf` for `b` (idempotent).
pub async fn set_root_tbf(nl_: &Netlink, index: u32, b: &TokenBucket) -> Result<()> {
    let mut msg = TcMessage::with_index(index_i32(index)?);
    msg.header.parent = TcHandle::ROOT;
    msg.header.handle = TcHandle { major: 1, minor: 0 };
    msg.attributes.push(TcAttribute::Kind("tbf".to_string()));
    msg.attributes.push(TcAttribute::Options(
        tbf_options(b)
            .into_iter()
            .map(|(kind, value)| TcOption::Other(DefaultNla::new(kind, value)))
            .collect(),
    ));
    request(
        nl_,
        RouteNetlinkMessage::NewQueueDiscipline(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
        &format!("setting a tbf qdisc on link #{index}"),
    )
    .await
}

/// Remove the root qdisc of link `index` (back to the default); no error when there is none.
pub async fn clear_root_qdisc(nl_: &Netlink, index: u32) -> Result<()> {
    let mut msg = TcMessage::with_index(index_i32(index)?);
    msg.header.parent = TcHandle::ROOT;
    match request(
        nl_,
        RouteNetlinkMessage::DelQueueDiscipline(msg),
        0,
        &format!("removing the root qdisc of link #{index}"),
    )
    .await
    {
        Err(DataplaneError::Netlink { source, .. })
            if matches!(errno(&source), Some(ENOENT) | Some(EINVAL)) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Remove the ingress qdisc of link `index` (and its filters); no error when there is none.
pub async fn clear_ingress(nl_: &Netlink, index: u32) -> Result<()> {
    let mut msg = TcMessage::with_index(index_i32(index)?);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = TcHandle::from(0xffff_0000);
    match request(
        nl_,
        RouteNetlinkMessage::DelQueueDiscipline(msg),
        0,
        &format!("removing the ingress qdisc of link #{index}"),
    )
    .await
    {
        Err(DataplaneError::Netlink { source, .. })
            if matches!(errno(&source), Some(ENOENT) | Some(EINVAL)) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Redirect everything link `from` receives to the egress of link `to`: a fresh ingress qdisc
/// on `from` (an earlier one and its filters are removed first, so a retry leaves one filter)
/// with a u32 match-all filter and a `mirred egress redirect` action.
pub async fn redirect_ingress(nl_: &Netlink, from: u32, to: u32) -> Result<()> {
    clear_ingress(nl_, from).await?;
    let h = nl_.handle.clone();
    match h.qdisc().add(index_i32(from)?).ingress().execute().await {
        Ok(()) => {}
        Err(e) if matches!(errno(&e), Some(EEXIST)) => {}
        Err(e) => {
            return Err(DataplaneError::Netlink {
                op: format!("adding an ingress qdisc to link #{from}"),
                source: e,
            })
        }
    }
    h.traffic_filter(index_i32(from)?)
        .add()
        .parent(0xffff_0000)
        .priority(FILTER_PRIORITY)
        // The filter header carries the protocol in network byte order, as tc(8) sends it.
        .protocol(ETH_P_ALL.to_be())
        .redirect(to)
        .map_err(nl(format!("building the redirect of link #{from}")))?
        .execute()
        .await
        .map_err(nl(format!(
            "redirecting link #{from}'s ingress to link #{to}"
        )))
}

/// Make sure the IFB device `name` exists, is up and has `mtu`; returns its index. A link of
/// that name that is not an IFB device is not ours to use: a conflict.
pub async fn ensure_ifb(nl_: &Netlink, name: &str, mtu: u32) -> Result<u32> {
    match nl_.link_by_name(name).await? {
        Some(l) if l.kind.as_deref() == Some("ifb") => {}
        Some(l) => {
            return Err(DataplaneError::Conflict(format!(
                "link {name} exists and is a {} device, not an IFB",
                l.kind.as_deref().unwrap_or("plain")
            )))
        }
        None => {
            let msg = LinkIfb::new(name).mtu(mtu).up().build();
            match nl_.handle.link().add(msg).execute().await {
                Ok(()) => {}
                Err(e) if matches!(errno(&e), Some(EEXIST)) => {}
                Err(e) => {
                    return Err(DataplaneError::Netlink {
                        op: format!("creating IFB device {name}"),
                        source: e,
                    })
                }
            }
        }
    }
    let index = nl_
        .link_index(name)
        .await?
        .ok_or_else(|| DataplaneError::NotFound(format!("IFB device {name} vanished")))?;
    nl_.set_up(index).await?;
    Ok(index)
}

/// Shape the host end `host_index` of a veth as `shaping` says, with `ifb` (a device name) for
/// the egress direction, all of MTU `mtu`. Idempotent: a direction without a bucket has its
/// qdisc removed (and the IFB deleted), so applying again after a change converges.
pub async fn apply_shaping(
    nl_: &Netlink,
    host_index: u32,
    ifb: &str,
    mtu: u32,
    shaping: &Shaping,
) -> Result<()> {
    match &shaping.ingress {
        Some(b) => set_root_tbf(nl_, host_index, b).await?,
        None => clear_root_qdisc(nl_, host_index).await?,
    }
    match &shaping.egress {
        Some(b) => {
            let ifb_index = ensure_ifb(nl_, ifb, mtu).await?;
            set_root_tbf(nl_, ifb_index, b).await?;
            redirect_ingress(nl_, host_index, ifb_index).await?;
        }
        None => {
            clear_ingress(nl_, host_index).await?;
            remove_ifb(nl_, ifb).await?;
        }
    }
    Ok(())
}

/// The kinds of the qdiscs of link `index`, as (root, ingress): `Some("tbf")`, `Some("ingress")`
/// or None where the link has none of its own (the default).
pub async fn qdisc_kinds(nl_: &Netlink, index: u32) -> Result<(Option<String>, Option<String>)> {
    let want = index_i32(index)?;
    let mut dump = nl_.handle.clone().qdisc().get().index(want).execute();
    let (mut root, mut ingress) = (None, None);
    while let Some(m) = dump
        .next()
        .await
        .transpose()
        .map_err(nl(format!("listing the qdiscs of link #{index}")))?
    {
        // The kernel may dump every link's qdiscs: keep this link's.
        if m.header.index != want {
            continue;
        }
        let kind = m.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        });
        if m.header.parent == TcHandle::ROOT {
            root = kind;
        } else if m.header.parent == TcHandle::INGRESS {
            ingress = kind;
        }
    }
    Ok((root, ingress))
}

/// What is missing of `shaping` on host end `host_index` and IFB `ifb`; empty when all is in
/// place (for CNI CHECK).
pub async fn shaping_problems(
    nl_: &Netlink,
    host_index: u32,
    ifb: &str,
    shaping: &Shaping,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let (root, ingress) = qdisc_kinds(nl_, host_index).await?;
    if shaping.ingress.is_some() && root.as_deref() != Some("tbf") {
        out.push(format!(
            "link #{host_index} has no tbf qdisc (ingress limit)"
        ));
    }
    if shaping.egress.is_some() {
        if ingress.as_deref() != Some("ingress") {
            out.push(format!(
                "link #{host_index} has no ingress qdisc (egress limit)"
            ));
        }
        match nl_.link_by_name(ifb).await? {
            Some(l) if l.kind.as_deref() == Some("ifb") => {
                if qdisc_kinds(nl_, l.index).await?.0.as_deref() != Some("tbf") {
                    out.push(format!("IFB device {ifb} has no tbf qdisc (egress limit)"));
                }
            }
            _ => out.push(format!("IFB device {ifb} is missing (egress limit)")),
        }
    }
    Ok(out)
}

/// Delete the IFB device `name`; false when it was not there.
pub async fn remove_ifb(nl_: &Netlink, name: &str) -> Result<bool> {
    nl_.delete_link(name).await
}

fn index_i32(index: u32) -> Result<i32> {
    i32::try_from(index)
        .map_err(|_| DataplaneError::NotFound(format!("link index {index} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn tbf_qopt_layout_matches_pkt_sched_h() {
        let b = TokenBucket {
            rate_bytes: 1_250_000,
            burst_bytes: 12_500,
            buffer_ticks: 156_250,
            limit_bytes: 43_750,
        };
        let opts = tbf_options(&b);
        assert_eq!(opts.len(), 2, "no RATE64 for a 32-bit rate");
        let (kind, qopt) = &opts[0];
        assert_eq!(*kind, TCA_TBF_PARMS);
        // struct tc_tbf_qopt { tc_ratespec rate, peakrate; u32 limit, buffer, mtu; }
        assert_eq!(qopt.len(), 36);
        // tc_ratespec { u8 cell_log; u8 linklayer; u16 overhead; s16 cell_align; u16 mpu; u32 rate; }
        assert_eq!(qopt[0], 0, "cell_log");
        assert_eq!(qopt[1], TC_LINKLAYER_ETHERNET);
        assert_eq!(&qopt[2..8], &[0u8; 6], "overhead, cell_align, mpu");
        assert_eq!(u32_at(qopt, 8), 1_250_000, "rate");
        assert_eq!(&qopt[12..24], &[0u8; 12], "no peak rate");
        assert_eq!(u32_at(qopt, 24), 43_750, "limit");
        assert_eq!(u32_at(qopt, 28), 156_250, "buffer");
        assert_eq!(u32_at(qopt, 32), 0, "mtu");
        assert_eq!(opts[1], (TCA_TBF_BURST, 12_500u32.to_ne_bytes().to_vec()));
    }

    #[test]
    fn rates_beyond_32_bits_use_rate64() {
        let b = TokenBucket {
            rate_bytes: 12_500_000_000,
            burst_bytes: 1_000_000,
            buffer_ticks: 1_250,
            limit_bytes: 313_500_000,
        };
        let opts = tbf_options(&b);
        assert_eq!(
            u32_at(&opts[0].1, 8),
            u32::MAX,
            "the 32-bit field says: see RATE64"
        );
        assert_eq!(
            opts[2],
            (TCA_TBF_RATE64, 12_500_000_000u64.to_ne_bytes().to_vec())
        );
    }

    #[test]
    fn filter_protocol_is_big_endian_eth_p_all() {
        // tc(8) sends htons(ETH_P_ALL) in the low 16 bits of tcm_info.
        assert_eq!(ETH_P_ALL.to_be().to_ne_bytes(), [0x00, 0x03]);
    }
}
