//! DNAT: service VIPs on the sending host, published and ingress ports on the receiving one.

use super::*;

/// A VIP: the load balancer on the sending host picks a healthy producer.
pub(super) fn vip_dnat(
    w: &mut Walk,
    host: Option<&str>,
    svc: &Service,
    vip: IpAddr,
) -> Result<Target, Verdict> {
    let q = w.q;
    let Some(port) = q.port else {
        return Err(w.drop(
            host,
            Step::Dnat,
            Basis::Store,
            format!("{vip} is service {}'s VIP: only its ports answer", svc.name),
        ));
    };
    if !svc
        .ports
        .iter()
        .any(|p| p.port == port && q.l4.matches(p.protocol))
    {
        return Err(w.drop(
            host,
            Step::Dnat,
            Basis::Store,
            format!(
                "{vip} is service {}'s VIP, which has no port {port}/{}",
                svc.name,
                q.l4.as_str()
            ),
        ));
    }
    pick_producer(w, host, svc, port, None, &format!("VIP {vip}:{port}"))
}

/// Healthy producers of `svc` (only `local_to`'s when set); the first is followed.
fn pick_producer(
    w: &mut Walk,
    host: Option<&str>,
    svc: &Service,
    port: u16,
    local_to: Option<&str>,
    element: &str,
) -> Result<Target, Verdict> {
    let v6 = w.q.v6;
    let healthy: Vec<&Producer> =
        w.f.producers
            .iter()
            .filter(|p| p.producer.service == svc.name && p.healthy)
            .map(|p| &p.producer)
            .filter(|p| p.addr(v6).is_some())
            .filter(|p| local_to.is_none_or(|h| p.host.as_deref() == Some(h)))
            .collect();
    let Some(first) = healthy.first() else {
        return Err(w.drop(
            host,
            Step::Dnat,
            Basis::Store,
            format!(
                "{element} (service {}): no healthy producer{}",
                svc.name,
                if local_to.is_some() {
                    " on this host (local ingress)"
                } else {
                    ""
                }
            ),
        ));
    };
    let addr = first.addr(v6).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let tport = first.target_port(port);
    w.hop(
        host,
        Step::Dnat,
        Basis::Store,
        format!(
            "{element} of service {} → one of {} healthy producer(s) ({}); following {} {addr}:{tport}{}",
            svc.name,
            healthy.len(),
            healthy
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            first.id,
            first
                .host
                .as_deref()
                .map(|h| format!(" on {h}"))
                .unwrap_or_default()
        ),
    );
    Ok(Target {
        addr,
        port: Some(tport),
        dnat: true,
    })
}

/// A packet for host `h`'s address: a published port of one of its endpoints, or an ingress
/// port; None when neither (the host itself receives it).
pub(super) fn host_dnat(w: &mut Walk, h: &str, dst: IpAddr) -> Result<Option<Target>, Verdict> {
    let f = w.f;
    let q = w.q;
    let Some(port) = q.port else {
        return Ok(None);
    };
    for e in &f.endpoints {
        if ep_host(e, h) != h {
            continue;
        }
        for m in &e.port_mappings {
            let ip_ok = match m.host_ip {
                None => true,
                Some(ip) if ip.is_unspecified() => ip.is_ipv6() == dst.is_ipv6(),
                Some(ip) => ip == dst,
            };
            if m.host_port != port || !q.l4.matches(m.protocol) || !ip_ok {
                continue;
            }
            let Some(addr) = e
                .ips
                .iter()
                .map(|n| n.addr())
                .find(|a| a.is_ipv6() == dst.is_ipv6())
            else {
                continue;
            };
            let map = match (dst.is_ipv6(), m.host_ip.filter(|i| !i.is_unspecified())) {
                (false, None) => "pm4_any",
                (true, None) => "pm6_any",
                (false, Some(_)) => "pm4_ip",
                (true, Some(_)) => "pm6_ip",
            };
            w.hop(
                Some(h),
                Step::Dnat,
                Basis::Store,
                format!(
                    "published port {port}/{} of {} → {addr}:{} (inet ferrynet map {map})",
                    q.l4.as_str(),
                    ep_label(e),
                    m.container_port
                ),
            );
            return Ok(Some(Target {
                addr,
                port: Some(m.container_port),
                dnat: true,
            }));
        }
    }
    for svc in &f.services {
        if let Some(ing) = svc
            .ingress
            .iter()
            .find(|i| i.published == port && q.l4.matches(i.protocol))
        {
            let local = ing.local.then_some(h);
            let t = pick_producer(
                w,
                Some(h),
                svc,
                ing.target,
                local,
                &format!("ingress port {port} → service port {}", ing.target),
            )?;
            return Ok(Some(t));
        }
    }
    Ok(None)
}
