//! `ip route get ADDR` over netlink: the route the kernel of the caller's namespace picks for
//! one destination (for `ferrynet trace`).

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::AddressFamily;

use crate::error::{errno, DataplaneError, Result};
use crate::netlink::Netlink;

/// The kernel's answer to a route lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAnswer {
    /// A route: next hop, output device name, route protocol, preferred source.
    Route {
        /// Next hop (None: on-link).
        gateway: Option<IpAddr>,
        /// Output device name (its index when the name cannot be read).
        dev: String,
        /// The route's protocol number.
        protocol: u8,
        /// Preferred source address.
        prefsrc: Option<IpAddr>,
    },
    /// The kernel refused: no route, unreachable, prohibited (its error text).
    Refused(String),
}

fn addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

impl Netlink {
    /// The route this namespace's kernel picks for `dst` (an output lookup, as `ip route get`).
    pub async fn route_get(&self, dst: IpAddr) -> Result<RouteAnswer> {
        let mut msg = RouteMessage::default();
        let (family, len, a) = match dst {
            IpAddr::V4(v) => (AddressFamily::Inet, 32, RouteAddress::Inet(v)),
            IpAddr::V6(v) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(v)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(a));
        let req = self.handle.route().get(msg);
        let answer = match req.execute().try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(RouteAnswer::Refused("no answer".into())),
            Err(e) => {
                return match errno(&e) {
                    Some(code) => Ok(RouteAnswer::Refused(
                        std::io::Error::from_raw_os_error(code).to_string(),
                    )),
                    None => Err(DataplaneError::Netlink {
                        op: format!("route get {dst}"),
                        source: e,
                    }),
                }
            }
        };
        let mut gateway = None;
        let mut oif = None;
        let mut prefsrc = None;
        for at in &answer.attributes {
            match at {
                RouteAttribute::Gateway(g) => gateway = addr(g),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::PrefSource(s) => prefsrc = addr(s),
                _ => {}
            }
        }
        let dev = match oif {
            Some(i) => match self.link_by_index(i).await? {
                Some(l) => l.name,
                None => format!("if{i}"),
            },
            None => String::new(),
        };
        Ok(RouteAnswer::Route {
            gateway,
            dev,
            protocol: u8::from(answer.header.protocol),
            prefsrc,
        })
    }
}
