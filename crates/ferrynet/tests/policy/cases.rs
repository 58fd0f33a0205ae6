//! The truth table's cases: policies and the matrices they must produce, written by hand.
//! Rows are sources, columns destinations, both in the order a1 a2 a3 b1 b2 b3 c1 c2 c3 out
//! (`N` of a group runs on host hN; `out` is a namespace on the underlay). `1`: the server
//! answered (TCP 80 / UDP 53); `0`: nothing came back; `-`: not probed.

use super::{Case, Grid, ALL_OPEN};

/// Every container's ingress closed: nothing reaches a container; the outside still answers.
const INGRESS_CLOSED: Grid = [
    "-000000001",
    "0-00000001",
    "00-0000001",
    "000-000001",
    "0000-00001",
    "00000-0001",
    "000000-001",
    "0000000-01",
    "00000000-1",
    "000000000-",
];

/// Every container's egress closed: containers reach nothing; the outside reaches them.
const EGRESS_CLOSED: Grid = [
    "-000000000",
    "0-00000000",
    "00-0000000",
    "000-000000",
    "0000-00000",
    "00000-0000",
    "000000-000",
    "0000000-00",
    "00000000-0",
    "111111111-",
];

/// The a containers take nothing in; everything else is open.
const A_CLOSED: Grid = [
    "-001111111",
    "0-01111111",
    "00-1111111",
    "000-111111",
    "0001-11111",
    "00011-1111",
    "000111-111",
    "0001111-11",
    "00011111-1",
    "000111111-",
];

/// The b containers take nothing in; everything else is open.
const B_CLOSED: Grid = [
    "-110001111",
    "1-10001111",
    "11-0001111",
    "111-001111",
    "1110-01111",
    "11100-1111",
    "111000-111",
    "1110001-11",
    "11100011-1",
    "111000111-",
];

/// Containers reach each other but not the outside... from the c group only.
const C_NOT_OUT: Grid = [
    "-111111111",
    "1-11111111",
    "11-1111111",
    "111-111111",
    "1111-11111",
    "11111-1111",
    "111111-110",
    "1111111-10",
    "11111111-0",
    "111111111-",
];

/// The outside may not reach b; everything else is open.
const B_NOT_FROM_OUT: Grid = [
    "-111111111",
    "1-11111111",
    "11-1111111",
    "111-111111",
    "1111-11111",
    "11111-1111",
    "111111-111",
    "1111111-11",
    "11111111-1",
    "111000111-",
];

pub const A_FROM_B: &str = "name: deny-in
selector: \"\"
ingress: []
---
name: a-from-b
selector: app=a
ingress:
- from: [{selector: app=b}]
";

/// deny-in plus a-from-b: only b reaches a; nothing else reaches any container.
pub const A_FROM_B_CASE: Case = Case {
    name: "allow by selector over default deny in",
    yaml: A_FROM_B,
    tcp4: [
        "-000000001",
        "0-00000001",
        "00-0000001",
        "111-000001",
        "1110-00001",
        "11100-0001",
        "000000-001",
        "0000000-01",
        "00000000-1",
        "000000000-",
    ],
    udp4: None,
    tcp6: None,
    udp6: None,
};

/// The same after c1 was relabelled app=b: c1 reaches the a containers too.
pub const A_FROM_B_C1_RELABELLED: Case = Case {
    name: "c1 relabelled app=b",
    yaml: A_FROM_B,
    tcp4: [
        "-000000001",
        "0-00000001",
        "00-0000001",
        "111-000001",
        "1110-00001",
        "11100-0001",
        "111000-001",
        "0000000-01",
        "00000000-1",
        "000000000-",
    ],
    udp4: None,
    tcp6: None,
    udp6: None,
};

const fn same(name: &'static str, yaml: &'static str, g: Grid) -> Case {
    Case {
        name,
        yaml,
        tcp4: g,
        udp4: None,
        tcp6: None,
        udp6: None,
    }
}

pub const CASES: &[Case] = &[
    same("no policy", "", ALL_OPEN),
    same(
        "default deny in",
        "name: deny-in\nselector: \"\"\ningress: []\n",
        INGRESS_CLOSED,
    ),
    same(
        "default deny out",
        "name: deny-out\nselector: \"\"\negress: []\n",
        EGRESS_CLOSED,
    ),
    A_FROM_B_CASE,
    same(
        "ingress by network",
        "name: a-from-fabric\nselector: app=a\ningress: [{from: [{network: fabric}]}]\n",
        [
            "-111111111",
            "1-11111111",
            "11-1111111",
            "111-111111",
            "1111-11111",
            "11111-1111",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "000111111-",
        ],
    ),
    Case {
        name: "ingress by CIDR with except (IPv4 only)",
        yaml: "name: a-cidr\nselector: app=a\ningress: [{from: [{cidr: 10.20.0.0/16, except: [\"{B2}\"]}]}]\n",
        tcp4: [
            "-111111111",
            "0-01111111",
            "11-1111111",
            "111-111111",
            "0001-11111",
            "11111-1111",
            "111111-111",
            "0001111-11",
            "11111111-1",
            "000111111-",
        ],
        udp4: None,
        tcp6: Some(A_CLOSED),
        udp6: None,
    },
    Case {
        name: "ingress to one port",
        yaml: "name: a-tcp80\nselector: app=a\ningress: [{ports: [tcp/80]}]\n",
        tcp4: ALL_OPEN,
        udp4: Some(A_CLOSED),
        tcp6: None,
        udp6: None,
    },
    Case {
        name: "port ranges",
        yaml: "name: a-ranges\nselector: app=a\ningress: [{ports: [tcp/81-8080, udp/50-60]}]\n",
        tcp4: A_CLOSED,
        udp4: Some(ALL_OPEN),
        tcp6: None,
        udp6: None,
    },
    same(
        "deny before allow by order",
        "name: deny-b\norder: 10\nselector: app=a\ningress: [{action: deny, from: [{selector: app=b}]}]\n---\nname: allow-all\norder: 20\nselector: app=a\ningress: [{}]\n",
        [
            "-111111111",
            "1-11111111",
            "11-1111111",
            "000-111111",
            "0001-11111",
            "00011-1111",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "111111111-",
        ],
    ),
    same(
        "allow before deny by order",
        "name: deny-b\norder: 10\nselector: app=a\ningress: [{action: deny, from: [{selector: app=b}]}]\n---\nname: allow-all\norder: 5\nselector: app=a\ningress: [{}]\n",
        ALL_OPEN,
    ),
    same(
        "egress only to the network",
        "name: c-inside\nselector: app=c\negress: [{to: [{network: fabric}]}]\n",
        C_NOT_OUT,
    ),
    same(
        "egress to outside denied by CIDR",
        "name: c-no-out\nselector: app=c\negress:\n- action: deny\n  to: [{cidr: 172.31.0.0/16}, {cidr: \"fd31::/64\"}]\n- {}\n",
        C_NOT_OUT,
    ),
    same(
        "egress by selector",
        "name: b-to-a\nselector: app=b\negress: [{to: [{selector: app=a}]}]\n",
        [
            "-111111111",
            "1-11111111",
            "11-1111111",
            "111-000000",
            "1110-00000",
            "11100-0000",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "111111111-",
        ],
    ),
    same(
        "both sides must allow",
        "name: a-from-b\nselector: app=a\ningress: [{from: [{selector: app=b}]}]\n---\nname: b-to-c\nselector: app=b\negress: [{to: [{selector: app=c}]}]\n",
        [
            "-001111111",
            "0-01111111",
            "00-1111111",
            "000-001110",
            "0000-01110",
            "00000-1110",
            "000111-111",
            "0001111-11",
            "00011111-1",
            "000111111-",
        ],
    ),
    same(
        "set-based selectors",
        "name: ab-from-c\nselector: \"app in (a,b)\"\ningress: [{from: [{selector: \"app notin (a,b)\"}]}]\n",
        [
            "-000001111",
            "0-00001111",
            "00-0001111",
            "000-001111",
            "0000-01111",
            "00000-1111",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "000000111-",
        ],
    ),
    same(
        "selector matching nothing",
        "name: nobody\nselector: role\ningress: []\negress: []\n",
        ALL_OPEN,
    ),
    Case {
        name: "UDP only into b",
        yaml: "name: b-udp\nselector: app=b\ningress: [{ports: [udp]}]\n",
        tcp4: B_CLOSED,
        udp4: Some(ALL_OPEN),
        tcp6: None,
        udp6: None,
    },
    Case {
        name: "ingress by IPv6 CIDR",
        yaml: "name: b-v6\nselector: app=b\ningress: [{from: [{cidr: \"fd20::/64\"}]}]\n",
        tcp4: B_CLOSED,
        udp4: None,
        tcp6: Some(B_NOT_FROM_OUT),
        udp6: None,
    },
    Case {
        name: "egress only UDP 53 to c",
        yaml: "name: a-dns\nselector: app=a\negress: [{to: [{selector: app=c}], ports: [udp/53]}]\n",
        tcp4: [
            "-000000000",
            "0-00000000",
            "00-0000000",
            "111-111111",
            "1111-11111",
            "11111-1111",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "111111111-",
        ],
        udp4: Some([
            "-000001110",
            "0-00001110",
            "00-0001110",
            "111-111111",
            "1111-11111",
            "11111-1111",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "111111111-",
        ]),
        tcp6: None,
        udp6: None,
    },
    same(
        "rule order inside a policy",
        "name: c-not-from-a\nselector: app=c\ningress:\n- action: deny\n  from: [{selector: app=a}]\n- action: allow\n",
        [
            "-111110001",
            "1-11110001",
            "11-1110001",
            "111-111111",
            "1111-11111",
            "11111-1111",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "111111111-",
        ],
    ),
    same(
        "two policies add up",
        "name: a-from-b\nselector: app=a\ningress: [{from: [{selector: app=b}]}]\n---\nname: a-from-out\nselector: app=a\ningress: [{from: [{cidr: 172.31.0.0/16}, {cidr: \"fd31::/64\"}]}]\n",
        [
            "-001111111",
            "0-01111111",
            "00-1111111",
            "111-111111",
            "1111-11111",
            "11111-1111",
            "000111-111",
            "0001111-11",
            "00011111-1",
            "111111111-",
        ],
    ),
    Case {
        name: "egress by set selector and port range",
        yaml: "name: b-out\nselector: app=b\negress: [{to: [{selector: \"app in (a, c)\"}], ports: [tcp/1-1024]}]\n",
        tcp4: [
            "-111111111",
            "1-11111111",
            "11-1111111",
            "111-001110",
            "1110-01110",
            "11100-1110",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "111111111-",
        ],
        udp4: Some([
            "-111111111",
            "1-11111111",
            "11-1111111",
            "000-000000",
            "0000-00000",
            "00000-0000",
            "111111-111",
            "1111111-11",
            "11111111-1",
            "111111111-",
        ]),
        tcp6: None,
        udp6: None,
    },
];
