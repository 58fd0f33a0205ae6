//! One peer's sessions, one after another: connect (or take the peer's connection), OPEN
//! exchange, collision resolution, Established, and what the routes do when it ends
//! (RFC 4271 section 8 without the timers nobody uses; RFC 4724 on the receiving side).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferrynet_model::bgp::peers::PeerSpec;
use ferrynet_model::bgp::policy::{import, ImportRules};
use ferrynet_model::bgp::rib::Path;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout};

use crate::speaker::{Exports, Inner};
use crate::wire::{self, codes, Decoder, GracefulRestart, Msg, Notify, Open, Update};

/// How long the OPEN exchange and the first KEEPALIVE may take.
const HANDSHAKE: Duration = Duration::from_secs(30);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why a connection ended.
enum End {
    /// We sent this NOTIFICATION.
    Sent(Notify),
    /// The peer sent this NOTIFICATION.
    Received(Notify),
    /// The TCP connection broke or closed.
    Closed(String),
    /// The peer came back on a new connection (it restarted).
    Replaced(TcpStream),
    /// The peer was removed from the configuration.
    Stopped,
}

/// One TCP connection with its decoder.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    dec: Decoder,
    /// The peer's OPEN.
    open: Open,
    local: IpAddr,
}

impl Conn {
    /// The next message; a malformed one is answered with its NOTIFICATION.
    async fn read(&mut self) -> Result<Msg, End> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(n) => {
                    let _ = send(&mut self.stream, &wire::notification_frame(&n)).await;
                    return Err(End::Sent(n));
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(End::Closed("the peer closed the connection".into())),
                Ok(_) => {}
                Err(e) => return Err(End::Closed(e.to_string())),
            }
        }
    }

    async fn notify(&mut self, n: Notify) -> End {
        let _ = send(&mut self.stream, &wire::notification_frame(&n)).await;
        let _ = self.stream.shutdown().await;
        End::Sent(n)
    }
}

async fn send(s: &mut TcpStream, b: &[u8]) -> std::io::Result<()> {
    s.write_all(b).await
}

fn our_open(inner: &Inner, spec: &PeerSpec) -> Open {
    let s = &inner.settings;
    Open {
        asn: spec.local_asn,
        hold_time: s.hold_time,
        router_id: s.router_id,
        ipv4: true,
        ipv6: true,
        route_refresh: true,
        asn4: true,
        graceful_restart: Some(GracefulRestart {
            restarting: s.restarted,
            time: s.restart_time,
            families: vec![(false, s.restarted), (true, s.restarted)],
        }),
    }
}

/// Refuse an OPEN we cannot work with (RFC 4271 6.2).
fn check_open(inner: &Inner, spec: &PeerSpec, o: &Open) -> Result<(), Notify> {
    if o.asn != spec.remote_asn {
        return Err(Notify {
            code: codes::OPEN,
            subcode: codes::BAD_PEER_AS,
            data: o.asn.to_be_bytes().to_vec(),
        });
    }
    if o.hold_time == 1 || o.hold_time == 2 {
        return Err(Notify::new(codes::OPEN, codes::BAD_HOLD_TIME));
    }
    let ibgp = spec.remote_asn == spec.local_asn;
    if o.router_id.is_unspecified() || (ibgp && o.router_id == inner.settings.router_id) {
        return Err(Notify::new(codes::OPEN, 3));
    }
    Ok(())
}

/// Send our OPEN on `stream` and read the peer's: the connection in OpenConfirm.
async fn open_exchange(
    inner: &Inner,
    spec: &PeerSpec,
    mut stream: TcpStream,
) -> Result<Conn, String> {
    let local = stream
        .local_addr()
        .map(|a| a.ip().to_canonical())
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let open = wire::encode(&Msg::Open(our_open(inner, spec))).ok_or("encoding OPEN")?;
    send(&mut stream, &open).await.map_err(|e| e.to_string())?;
    inner.with_status(&spec.name, |p| set_state(p, "OpenSent"));
    let mut c = Conn {
        stream,
        buf: BytesMut::with_capacity(8192),
        dec: Decoder::new(true),
        open: our_open(inner, spec),
        local,
    };
    let first = timeout(HANDSHAKE, c.read())
        .await
        .map_err(|_| "no OPEN from the peer".to_string())?;
    match first {
        Ok(Msg::Open(o)) => {
            if let Err(n) = check_open(inner, spec, &o) {
                let text = format!("sent {n}: refused the peer's OPEN");
                c.notify(n).await;
                return Err(text);
            }
            c.open = o;
            Ok(c)
        }
        Ok(Msg::Notification(n)) => Err(format!("received {n}")),
        Ok(_) => {
            let n = Notify::new(codes::FSM, 1);
            let text = format!("sent {n}: expected OPEN");
            c.notify(n).await;
            Err(text)
        }
        Err(End::Sent(n)) => Err(format!("sent {n}")),
        Err(End::Closed(e)) => Err(e),
        Err(_) => Err("connection ended".into()),
    }
}

/// Dial the peer after `delay`, with its TCP-MD5 key.
async fn dial(inner: &Inner, spec: &PeerSpec, delay: Duration) -> Result<Conn, String> {
    sleep(delay).await;
    let addr = SocketAddr::new(spec.address, inner.settings.peer_port);
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(pw) = &spec.password {
        crate::md5::set_key(&sock, spec.address, false, pw.as_bytes())
            .map_err(|e| format!("TCP-MD5: {e}"))?;
    }
    let stream = timeout(Duration::from_secs(5), sock.connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr}: timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    open_exchange(inner, spec, stream).await
}

fn set_state(p: &mut crate::speaker::PeerState, s: &str) {
    if p.state != s {
        p.state = s.to_string();
        p.since = Some(Instant::now());
    }
}

/// Run one peer until it is removed.
pub(crate) async fn run_peer(
    inner: Arc<Inner>,
    spec: PeerSpec,
    mut inbound: mpsc::Receiver<TcpStream>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = Duration::ZERO;
    let mut stale_until: Option<Instant> = None;
    let mut carried: Option<TcpStream> = None;
    loop {
        inner.with_status(&spec.name, |p| set_state(p, "Connect"));
        let far = Instant::now() + Duration::from_secs(86400);
        let got = if let Some(s) = carried.take() {
            open_exchange(&inner, &spec, s).await
        } else {
            tokio::select! {
                c = dial(&inner, &spec, delay) => c,
                Some(s) = inbound.recv() => open_exchange(&inner, &spec, s).await,
                _ = sleep_until(stale_until.unwrap_or(far).into()), if stale_until.is_some() => {
                    stale_until = None;
                    sweep(&inner, &spec.name, None);
                    continue;
                }
                _ = stop.changed() => return,
            }
        };
        let mut conn = match got {
            Ok(c) => c,
            Err(e) => {
                inner.with_status(&spec.name, |p| {
                    set_state(p, "Active");
                    p.last_error = Some(e);
                });
                delay = (delay * 2).clamp(inner.settings.connect_retry, MAX_RETRY);
                continue;
            }
        };
        inner.with_status(&spec.name, |p| set_state(p, "OpenConfirm"));
        match open_confirm(&inner, &spec, &mut conn, &mut inbound).await {
            Ok(Some(other)) => conn = other,
            Ok(None) => {}
            Err(e) => {
                inner.with_status(&spec.name, |p| p.last_error = Some(e));
                delay = (delay * 2).clamp(inner.settings.connect_retry, MAX_RETRY);
                continue;
            }
        }
        // The peer restarted within its restart time: its stale routes wait for End-of-RIB,
        // except in families whose forwarding state it did not keep.
        let peer_gr = conn.open.graceful_restart.clone();
        match &peer_gr {
            Some(g) => {
                for v6 in [false, true] {
                    if !g.families.iter().any(|(f, kept)| *f == v6 && *kept) {
                        sweep(&inner, &spec.name, Some(v6));
                    }
                }
            }
            None => sweep(&inner, &spec.name, None),
        }
        let end = established(&inner, &spec, &mut conn, &mut inbound, &mut stop).await;
        let (graceful, text) = match end {
            End::Stopped => return,
            End::Sent(n) => (false, format!("sent {n}")),
            End::Received(n) => (false, format!("received {n}")),
            End::Closed(e) => (true, e),
            End::Replaced(s) => {
                carried = Some(s);
                (true, "the peer reconnected (restart)".to_string())
            }
        };
        let gr_time = peer_gr.as_ref().map(|g| g.time).filter(|_| graceful);
        if let Ok(mut rib) = inner.rib.lock() {
            match gr_time {
                Some(t) => {
                    rib.mark_stale(&spec.name);
                    stale_until = Some(Instant::now() + Duration::from_secs(u64::from(t)));
                }
                None => {
                    rib.drop_peer(&spec.name);
                    stale_until = None;
                }
            }
        }
        inner.rib_changed();
        inner.with_status(&spec.name, |p| {
            set_state(p, "Idle");
            p.last_error = Some(text);
            p.synced = false;
            p.prefixes_out = 0;
        });
        delay = inner.settings.connect_retry.min(Duration::from_secs(1));
    }
}

fn sweep(inner: &Inner, peer: &str, family_v6: Option<bool>) {
    let n = inner
        .rib
        .lock()
        .map(|mut r| r.sweep_stale(peer, family_v6))
        .unwrap_or(0);
    if n > 0 {
        tracing::info!(peer, routes = n, "stale routes of a restarted peer removed");
        inner.rib_changed();
        inner.with_status(peer, |p| p.prefixes_in = p.prefixes_in.saturating_sub(n));
    }
}

/// Send KEEPALIVE, wait for the peer's. A connection from the peer meanwhile is a collision
/// (RFC 4271 6.8): the one opened by the higher BGP identifier stays. Returns the connection
/// to use instead when that is the new one.
async fn open_confirm(
    inner: &Inner,
    spec: &PeerSpec,
    conn: &mut Conn,
    inbound: &mut mpsc::Receiver<TcpStream>,
) -> Result<Option<Conn>, String> {
    let ka = wire::encode(&Msg::Keepalive).unwrap_or_default();
    send(&mut conn.stream, &ka)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + HANDSHAKE;
    loop {
        tokio::select! {
            m = conn.read() => return match m {
                Ok(Msg::Keepalive) => Ok(None),
                Ok(Msg::Notification(n)) => Err(format!("received {n}")),
                Ok(_) => {
                    let n = Notify::new(codes::FSM, 2);
                    conn.notify(n.clone()).await;
                    Err(format!("sent {n}: expected KEEPALIVE"))
                }
                Err(End::Sent(n)) => Err(format!("sent {n}")),
                Err(End::Closed(e)) => Err(e),
                Err(_) => Err("connection ended".into()),
            },
            Some(s) = inbound.recv() => {
                let Ok(mut other) = open_exchange(inner, spec, s).await else { continue };
                let collision = Notify::new(codes::CEASE, codes::COLLISION);
                // Our identifier is lower: the peer's connection (the new one) stays.
                if u32::from(inner.settings.router_id) < u32::from(other.open.router_id) {
                    conn.notify(collision).await;
                    send(&mut other.stream, &ka).await.map_err(|e| e.to_string())?;
                    let got = timeout(HANDSHAKE, other.read()).await;
                    return match got {
                        Ok(Ok(Msg::Keepalive)) => Ok(Some(other)),
                        _ => Err("the peer's connection failed after a collision".into()),
                    };
                }
                other.notify(collision).await;
            }
            _ = sleep_until(deadline) => {
                conn.notify(Notify::new(codes::HOLD_TIMER, 0)).await;
                return Err("no KEEPALIVE after OPEN".into());
            }
        }
    }
}

/// Session facts the Established loop needs.
struct Agreed {
    hold: u16,
    keepalive: Duration,
    families: [bool; 2],
    ebgp: bool,
    route_refresh: bool,
}

fn agree(inner: &Inner, spec: &PeerSpec, o: &Open) -> Agreed {
    let hold = inner.settings.hold_time.min(o.hold_time);
    let third = Duration::from_secs(u64::from(hold / 3).max(1));
    let keepalive = inner
        .settings
        .keepalive
        .map(|k| Duration::from_secs(u64::from(k).max(1)))
        .unwrap_or(third)
        .min(third);
    Agreed {
        hold,
        keepalive,
        families: [o.ipv4, o.ipv6],
        ebgp: spec.remote_asn != spec.local_asn,
        route_refresh: o.route_refresh,
    }
}

fn announce_of(spec: &PeerSpec, conn: &Conn, ex: &Exports, a: &Agreed) -> wire::Announce {
    wire::Announce {
        local_asn: spec.local_asn,
        ebgp: a.ebgp,
        asn4: conn.open.asn4,
        next_hop4: match conn.local {
            IpAddr::V4(l) => Some(l),
            IpAddr::V6(_) => ex.next_hop4,
        }
        .filter(|_| a.families[0]),
        next_hop6: match conn.local {
            IpAddr::V6(l) if l.segments()[0] & 0xffc0 != 0xfe80 => Some(l),
            _ => ex.next_hop6,
        }
        .filter(|_| a.families[1]),
    }
}

/// The Established state until the session ends.
async fn established(
    inner: &Inner,
    spec: &PeerSpec,
    conn: &mut Conn,
    inbound: &mut mpsc::Receiver<TcpStream>,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let a = agree(inner, spec, &conn.open);
    let peer_gr = conn.open.graceful_restart.is_some();
    let router_id = conn.open.router_id;
    inner.with_status(&spec.name, |p| {
        set_state(p, "Established");
        p.router_id = Some(router_id.to_string());
        p.hold_time = a.hold;
        p.graceful_restart = peer_gr;
        p.established_count += 1;
        p.prefixes_rejected = 0;
    });
    tracing::info!(peer = %spec.name, address = %spec.address, "BGP session established");
    let mut exports = inner.exports.clone();
    let mut policy = inner.policy.clone();
    let mut sent: BTreeSet<IpNet> = BTreeSet::new();
    let mut synced = [!a.families[0], !a.families[1]];
    if let Err(e) = sync_exports(spec, conn, &a, &mut exports, &mut sent, true).await {
        return e;
    }
    inner.with_status(&spec.name, |p| p.prefixes_out = sent.len());
    let hold = Duration::from_secs(u64::from(a.hold));
    let mut hold_deadline = tokio::time::Instant::now() + hold;
    let mut ka = tokio::time::interval(a.keepalive);
    let ka_frame = wire::encode(&Msg::Keepalive).unwrap_or_default();
    loop {
        tokio::select! {
            m = conn.read() => {
                let m = match m { Ok(m) => m, Err(e) => return e };
                hold_deadline = tokio::time::Instant::now() + hold;
                match m {
                    Msg::Keepalive => {}
                    Msg::Update(u) => {
                        if let Some(v6) = u.end_of_rib {
                            synced[usize::from(v6)] = true;
                            sweep(inner, &spec.name, Some(v6));
                            let all = synced == [true, true];
                            inner.with_status(&spec.name, |p| p.synced = all);
                        } else {
                            apply_update(inner, spec, router_id, a.ebgp, &u);
                        }
                    }
                    Msg::RouteRefresh(v6) => {
                        let fam: Vec<IpNet> = sent.iter().filter(|p| p.addr().is_ipv6() == v6).copied().collect();
                        let an = announce_of(spec, conn, &exports.borrow(), &a);
                        for f in wire::updates(&an, &fam, &[]) {
                            if let Err(e) = send(&mut conn.stream, &f).await { return End::Closed(e.to_string()) }
                        }
                    }
                    Msg::Notification(n) => return End::Received(n),
                    Msg::Open(_) => return conn.notify(Notify::new(codes::FSM, 3)).await,
                }
            }
            _ = sleep_until(hold_deadline), if a.hold > 0 => {
                return conn.notify(Notify::new(codes::HOLD_TIMER, 0)).await;
            }
            _ = ka.tick(), if a.hold > 0 => {
                if let Err(e) = send(&mut conn.stream, &ka_frame).await { return End::Closed(e.to_string()) }
            }
            r = exports.changed() => {
                if r.is_err() { return conn.notify(Notify::new(codes::CEASE, 2)).await }
                if let Err(e) = sync_exports(spec, conn, &a, &mut exports, &mut sent, false).await { return e }
                inner.with_status(&spec.name, |p| p.prefixes_out = sent.len());
            }
            r = policy.changed(), if a.route_refresh => {
                if r.is_err() { continue }
                // New pools or blocks: ask for the routes again, the import decides anew.
                for v6 in [false, true].into_iter().filter(|v6| a.families[usize::from(*v6)]) {
                    let rr = wire::encode(&Msg::RouteRefresh(v6)).unwrap_or_default();
                    if let Err(e) = send(&mut conn.stream, &rr).await { return End::Closed(e.to_string()) }
                }
            }
            Some(s) = inbound.recv() => {
                if peer_gr { return End::Replaced(s) }
                let mut s = s;
                let _ = send(&mut s, &wire::notification_frame(&Notify::new(codes::CEASE, codes::COLLISION))).await;
            }
            _ = stop.changed() => {
                conn.notify(Notify::new(codes::CEASE, codes::PEER_DECONFIGURED)).await;
                return End::Stopped;
            }
        }
    }
}

/// Send what changed in the exports since `sent` (everything plus End-of-RIB the first time).
async fn sync_exports(
    spec: &PeerSpec,
    conn: &mut Conn,
    a: &Agreed,
    exports: &mut watch::Receiver<Exports>,
    sent: &mut BTreeSet<IpNet>,
    first: bool,
) -> Result<(), End> {
    let ex = exports.borrow_and_update().clone();
    let an = announce_of(spec, conn, &ex, a);
    let carried = |p: &IpNet| {
        if p.addr().is_ipv4() {
            an.next_hop4.is_some()
        } else {
            an.next_hop6.is_some()
        }
    };
    let want: BTreeSet<IpNet> = ex.prefixes.iter().filter(|p| carried(p)).copied().collect();
    let add: Vec<IpNet> = want.difference(sent).copied().collect();
    let del: Vec<IpNet> = sent.difference(&want).copied().collect();
    let mut frames = wire::updates(&an, &add, &del);
    if first {
        for v6 in [false, true]
            .into_iter()
            .filter(|v6| a.families[usize::from(*v6)])
        {
            frames.push(wire::end_of_rib(v6));
        }
    }
    for f in frames {
        send(&mut conn.stream, &f)
            .await
            .map_err(|e| End::Closed(e.to_string()))?;
    }
    if !add.is_empty() || !del.is_empty() {
        // With the agent's "announcements changed" and "BGP routes" lines: where the time goes.
        tracing::debug!(peer = %spec.name, add = add.len(), del = del.len(), "UPDATE sent");
    }
    *sent = want;
    Ok(())
}

/// Withdrawals, then announcements through the import policy, into the RIB.
fn apply_update(
    inner: &Inner,
    spec: &PeerSpec,
    router_id: std::net::Ipv4Addr,
    ebgp: bool,
    u: &Update,
) {
    let pol = inner.policy.borrow().clone();
    let rules = ImportRules {
        pools: &pol.pools,
        own: &pol.own,
        lent: &pol.lent,
        underlay: &pol.underlay,
        local_asn: spec.local_asn,
        accept_default: spec.accept_default,
    };
    let mut rejected = 0usize;
    let Ok(mut rib) = inner.rib.lock() else {
        return;
    };
    let mut changed = false;
    for p in &u.withdrawn {
        changed |= rib.withdraw(&spec.name, *p);
    }
    for p in &u.announced {
        let attrs = match (&u.attrs, u.treat_as_withdraw) {
            (Some(a), false) => a,
            _ => {
                changed |= rib.withdraw(&spec.name, *p);
                continue;
            }
        };
        let hops: Vec<IpAddr> = if p.addr().is_ipv4() {
            attrs.next_hop.map(IpAddr::V4).into_iter().collect()
        } else {
            attrs
                .next_hop6
                .map(|(g, l)| [Some(IpAddr::V6(g)), l.map(IpAddr::V6)])
                .into_iter()
                .flatten()
                .flatten()
                .collect()
        };
        let verdict = hops
            .iter()
            .map(|nh| import(&rules, *p, *nh, &attrs.as_path).map(|_| *nh))
            .find(Result::is_ok)
            .unwrap_or_else(|| match hops.first() {
                Some(nh) => import(&rules, *p, *nh, &attrs.as_path).map(|_| *nh),
                None => Err(ferrynet_model::bgp::policy::Rejected::OutsidePools(*p)),
            });
        match verdict {
            Ok(nh) => {
                rib.announce(
                    &spec.name,
                    *p,
                    Path {
                        next_hop: nh,
                        as_path_len: attrs.as_path_len,
                        origin: attrs.origin,
                        med: attrs.med.unwrap_or(0),
                        local_pref: if ebgp {
                            100
                        } else {
                            attrs.local_pref.unwrap_or(100)
                        },
                        ebgp,
                        router_id: u32::from(router_id),
                        peer_addr: spec.address,
                        stale: false,
                    },
                );
                changed = true;
            }
            Err(why) => {
                rejected += 1;
                tracing::debug!(peer = %spec.name, %why, "route refused");
                changed |= rib.withdraw(&spec.name, *p);
            }
        }
    }
    let count = rib.count_from(&spec.name);
    drop(rib);
    tracing::debug!(peer = %spec.name, announced = u.announced.len(), withdrawn = u.withdrawn.len(), changed, "UPDATE received");
    if changed {
        inner.rib_changed();
    }
    inner.with_status(&spec.name, |s| {
        s.prefixes_in = count;
        s.prefixes_rejected += rejected;
        if rejected > 0 {
            s.last_error = Some(format!("{rejected} route(s) refused by the import policy"));
        }
    });
}
