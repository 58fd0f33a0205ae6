//! Producers that tell who called them, and clients that collect the answers: the tests of
//! service traffic read source addresses on the producer's side.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

use super::out;

/// A producer's program (`python3 -c PRODUCER ID LOG`): TCP on port 8080 answers every
/// connection with `<ID> <peer address>\n`, then echoes until the client closes; UDP on port
/// 5353 appends `<payload> <peer address>` to the file LOG for every datagram and answers
/// `<ID> <peer address>`. Both families (IPv4 peers without `::ffff:`).
pub const PRODUCER: &str = "import socket,threading,sys\n\
    ident,log=sys.argv[1],open(sys.argv[2],'a')\n\
    def peer(a):\n  h=a[0]\n  return h[7:] if h.startswith('::ffff:') else h\n\
    def udp():\n  u=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n  \
    u.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);u.bind(('::',5353))\n  \
    while True:\n    d,a=u.recvfrom(2000);log.write(d.decode(errors='replace')+' '+peer(a)+'\\n');log.flush()\n    \
    u.sendto((ident+' '+peer(a)).encode(),a)\n\
    threading.Thread(target=udp,daemon=True).start()\n\
    s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
    s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',8080));s.listen(512)\n\
    def serve(c,a):\n  \
    try:\n    c.sendall((ident+' '+peer(a)+'\\n').encode())\n    \
    while True:\n      d=c.recv(4096)\n      if not d: break\n      c.sendall(d)\n  \
    except OSError: pass\n  c.close()\n\
    while True:\n  c,a=s.accept();threading.Thread(target=serve,args=(c,a),daemon=True).start()\n";

/// What `n` connections (or datagrams) from one client saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Answers per producer id.
    pub counts: BTreeMap<String, u64>,
    /// The peer addresses each producer reported.
    pub peers: BTreeMap<String, Vec<String>>,
    /// The first errors (exception names and messages).
    pub errors: Vec<String>,
    /// How many attempts failed.
    pub nerrors: u64,
}

impl Tally {
    /// Every attempt answered by producer `id`, which saw only `peer`.
    pub fn only(&self, id: &str, peer: &str) -> Result<(), String> {
        let ok = self.nerrors == 0
            && self.counts.len() == 1
            && self.counts.contains_key(id)
            && self.peers.get(id).map(Vec::as_slice) == Some(&[peer.to_string()][..]);
        ok.then_some(())
            .ok_or_else(|| format!("want only {id} seeing {peer}: {self:?}"))
    }
}

/// The client's program: `n` TCP connections (or UDP request/answer rounds with `udp`) to
/// `addr`:`port`, one after another, 3 s timeout each; prints the tally as JSON.
fn client_code(addr: &str, port: u16, n: u32, udp: bool) -> String {
    let fam = if addr.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let once = if udp {
        format!(
            "s=socket.socket(socket.{fam},socket.SOCK_DGRAM);s.settimeout(3);s.connect(('{addr}',{port}))\n    \
             s.send(b'probe');l=s.recv(200).decode().split();s.close()\n"
        )
    } else {
        format!(
            "s=socket.create_connection(('{addr}',{port}),timeout=3);f=s.makefile()\n    \
             l=f.readline().split();s.close()\n"
        )
    };
    format!(
        "import socket,json\n\
         counts={{}};peers={{}};errors=[]\n\
         for i in range({n}):\n  \
         try:\n    {once}    counts[l[0]]=counts.get(l[0],0)+1\n    \
         peers.setdefault(l[0],set()).add(l[1])\n  \
         except Exception as e:\n    errors.append(type(e).__name__+': '+str(e))\n\
         print(json.dumps({{'counts':counts,'peers':{{k:sorted(v) for k,v in peers.items()}},'errors':errors[:5],'nerrors':len(errors)}}))\n"
    )
}

/// Run the client in namespace `ns` (a name under /run/netns).
pub fn connect(ns: &str, addr: &str, port: u16, n: u32, udp: bool) -> Tally {
    let o = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{ns}"),
            "python3",
            "-c",
            &client_code(addr, port, n, udp),
        ])
        .output()
        .expect("python3");
    assert!(o.status.success(), "client in {ns}: {}", out(&o));
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("client output ({e}): {}", out(&o)));
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let obj = |k: &str| v[k].as_object().cloned().unwrap_or_default();
    Tally {
        counts: obj("counts")
            .iter()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
            .collect(),
        peers: obj("peers")
            .iter()
            .map(|(k, l)| (k.clone(), strings(l)))
            .collect(),
        errors: strings(&v["errors"]),
        nerrors: v["nerrors"].as_u64().unwrap_or(u64::MAX),
    }
}
