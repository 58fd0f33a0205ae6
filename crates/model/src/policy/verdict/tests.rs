use super::*;
use crate::policy::document::parse_documents;

fn ep(id: &str, net: &str, ip: &str, labels: &[(&str, &str)]) -> PolicyEndpoint {
    PolicyEndpoint {
        id: format!("{net}/{id}/eth0").into(),
        name: Some(id.into()),
        network: net.into(),
        host: Some("h1".into()),
        addrs: vec![ip.parse().unwrap()],
        labels: Arc::new(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn index() -> EndpointIndex {
    EndpointIndex::new(vec![
        ep("web", "blue", "10.0.0.2", &[("app", "web")]),
        ep("client", "blue", "10.0.0.3", &[("role", "client")]),
        ep("other", "blue", "10.0.0.4", &[]),
        ep("green", "green", "10.9.0.2", &[("role", "client")]),
    ])
}

fn book(yaml: &str, deny: &[&str]) -> PolicyBook {
    PolicyBook::new(
        parse_documents(yaml).unwrap(),
        deny.iter().map(|s| s.to_string()).collect(),
    )
}

fn verdict(b: &PolicyBook, src: &str, dst: &str, proto: Option<Proto>, port: u16) -> Verdict {
    decide(
        b,
        &index(),
        src.parse().unwrap(),
        dst.parse().unwrap(),
        proto,
        port,
    )
}

fn allowed(b: &PolicyBook, src: &str, dst: &str, proto: Option<Proto>, port: u16) -> bool {
    verdict(b, src, dst, proto, port).allowed
}

const TCP: Option<Proto> = Some(Proto::Tcp);
const UDP: Option<Proto> = Some(Proto::Udp);

#[test]
fn unselected_endpoints_are_open() {
    let b = book("name: p\nselector: app=db\ningress: []\n", &[]);
    assert!(allowed(&b, "10.0.0.3", "10.0.0.2", TCP, 80));
    let v = verdict(&b, "10.0.0.3", "10.0.0.2", TCP, 80);
    assert_eq!(v.ingress.unwrap().decision, Decision::Open);
}

#[test]
fn selected_ingress_allows_only_what_a_rule_allows() {
    let b = book(
        "name: web\nnetwork: blue\nselector: app=web\ningress:\n- from: [{selector: role=client}]\n  ports: [tcp/80, udp/53, tcp/8000-8080]\n",
        &[],
    );
    assert!(allowed(&b, "10.0.0.3", "10.0.0.2", TCP, 80));
    assert!(allowed(&b, "10.0.0.3", "10.0.0.2", TCP, 8080));
    assert!(allowed(&b, "10.0.0.3", "10.0.0.2", UDP, 53));
    assert!(!allowed(&b, "10.0.0.3", "10.0.0.2", UDP, 80));
    assert!(!allowed(&b, "10.0.0.3", "10.0.0.2", TCP, 81));
    assert!(!allowed(&b, "10.0.0.3", "10.0.0.2", None, 0));
    // Not a client; a client on another network (the policy's network scopes its selector).
    assert!(!allowed(&b, "10.0.0.4", "10.0.0.2", TCP, 80));
    assert!(!allowed(&b, "10.9.0.2", "10.0.0.2", TCP, 80));
    // Egress is not restricted by it.
    assert!(allowed(&b, "10.0.0.2", "10.0.0.4", TCP, 22));
    let v = verdict(&b, "10.0.0.4", "10.0.0.2", TCP, 80);
    assert_eq!(
        v.ingress.unwrap().decision,
        Decision::Default {
            policies: vec!["web".into()]
        }
    );
}

#[test]
fn order_decides_between_deny_and_allow() {
    let text = "name: allow-all\norder: ORDER_A\nselector: app=web\ningress: [{}]\n---\nname: deny-client\norder: 10\nselector: app=web\ningress: [{action: deny, from: [{selector: role=client}]}]\n";
    let deny_first = book(&text.replace("ORDER_A", "20"), &[]);
    assert!(!allowed(&deny_first, "10.0.0.3", "10.0.0.2", TCP, 80));
    assert!(allowed(&deny_first, "10.0.0.4", "10.0.0.2", TCP, 80));
    let allow_first = book(&text.replace("ORDER_A", "5"), &[]);
    assert!(allowed(&allow_first, "10.0.0.3", "10.0.0.2", TCP, 80));
    let v = verdict(&allow_first, "10.0.0.3", "10.0.0.2", TCP, 80);
    assert_eq!(
        v.ingress.unwrap().decision,
        Decision::Rule {
            policy: "allow-all".into(),
            rule: 0,
            action: Action::Allow
        }
    );
    // Without an order a policy comes after every ordered one.
    let unordered = book(&text.replace("order: ORDER_A\n", ""), &[]);
    assert!(!allowed(&unordered, "10.0.0.3", "10.0.0.2", TCP, 80));
}

#[test]
fn cidr_with_except_and_egress_to_the_outside() {
    let b = book(
        "name: out\nselector: role=client\negress:\n- to: [{cidr: 10.0.0.0/8, except: [10.0.0.4/32]}]\n- action: deny\n  to: [{cidr: 0.0.0.0/0}]\n",
        &[],
    );
    assert!(allowed(&b, "10.0.0.3", "10.0.0.2", TCP, 80));
    assert!(!allowed(&b, "10.0.0.3", "10.0.0.4", TCP, 80));
    assert!(!allowed(&b, "10.0.0.3", "192.0.2.1", UDP, 53));
    assert!(allowed(&b, "10.0.0.2", "192.0.2.1", UDP, 53));
    // IPv6 destinations match no IPv4 block: selected and unmatched, so denied.
    assert!(!allowed(&b, "10.0.0.3", "2001:db8::1", TCP, 80));
}

#[test]
fn default_deny_networks_and_peers_by_network() {
    let none = book("name: x\nselector: nothing=here\ningress: []\n", &["blue"]);
    assert!(!allowed(&none, "10.0.0.3", "10.0.0.2", TCP, 80));
    assert!(!allowed(&none, "10.0.0.2", "192.0.2.1", TCP, 80));
    assert!(allowed(&none, "10.9.0.2", "192.0.2.1", TCP, 80));
    let v = verdict(&none, "10.0.0.3", "10.0.0.2", TCP, 80);
    assert_eq!(
        v.egress.unwrap().decision,
        Decision::Default { policies: vec![] }
    );
    let b = book(
        "name: g\nselector: app=web\ningress: [{from: [{network: green}]}]\n",
        &[],
    );
    assert!(allowed(&b, "10.9.0.2", "10.0.0.2", TCP, 1));
    assert!(!allowed(&b, "10.0.0.3", "10.0.0.2", TCP, 1));
}

#[test]
fn names_find_endpoints() {
    let i = index();
    assert_eq!(i.by_name("web").len(), 1);
    assert_eq!(i.by_name("blue/web").len(), 1);
    assert!(i.by_name("nobody").is_empty());
}
