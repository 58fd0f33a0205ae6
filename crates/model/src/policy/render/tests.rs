use super::*;
use crate::policy::document::parse_documents;
use crate::policy::verdict::PolicyEndpoint;

fn ep(id: &str, host: &str, ips: &[&str], labels: &[(&str, &str)]) -> PolicyEndpoint {
    PolicyEndpoint {
        id: format!("blue/{id}/eth0").into(),
        name: Some(id.into()),
        network: "blue".into(),
        host: Some(host.into()),
        addrs: ips.iter().map(|i| i.parse().unwrap()).collect(),
        labels: std::sync::Arc::new(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

const POLICIES: &str = "name: web
selector: app=web
order: 1
ingress:
- from: [{selector: role=client}, {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
  ports: [tcp/80, udp/53, tcp/8000-8080]
- action: deny
egress:
- to: [{cidr: 0.0.0.0/0}]
  ports: [udp]
";

fn setup(eps: Vec<PolicyEndpoint>) -> Option<Desired> {
    let book = PolicyBook::new(parse_documents(POLICIES).unwrap(), Default::default());
    let idx = EndpointIndex::new(eps);
    desired(&book, &idx, &|e| e.host.as_deref() == Some("h1"))
}

#[test]
fn rules_follow_policies_and_elements_follow_endpoints() {
    let web = ep("web", "h1", &["10.0.0.2", "fd00::2"], &[("app", "web")]);
    let d = setup(vec![
        web.clone(),
        ep("c1", "h2", &["10.0.0.3", "fd00::3"], &[("role", "client")]),
    ])
    .unwrap();
    let s = &d.skeleton;
    assert!(s.contains("ip saddr 10.0.0.0/8 ip saddr != { 10.1.0.0/16 } meta l4proto tcp th dport { 80, 8000-8080 } accept"), "{s}");
    assert!(s.contains("meta l4proto udp th dport { 53 } accept"), "{s}");
    assert!(s.contains("    counter name policy_default drop\n"), "{s}");
    // Both drop counters are declared, so the rules naming them load.
    assert!(s.contains("counter policy_deny { }") && s.contains("counter policy_default { }"));
    assert!(DENY_VERDICT.contains(DENY_COUNTER));
    assert!(
        s.contains("ip daddr 0.0.0.0/0 meta l4proto udp goto ingress"),
        "{s}"
    );
    let set4 = d
        .elements
        .iter()
        .find(|(k, _)| k.starts_with("e_") && k.ends_with("_4"))
        .unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(set4.1.keys().collect::<Vec<_>>(), [&ip("10.0.0.3")]);
    assert!(d.elements["in4"][&ip("10.0.0.2")].starts_with("jump pr_in_"));
    assert!(d.elements["out6"][&ip("fd00::2")].starts_with("jump pr_out_"));
    // Many more clients: the same skeleton, more elements; the change is elements only.
    let mut many = vec![web];
    for i in 0..50u8 {
        let ip = format!("10.0.1.{i}");
        many.push(ep(&format!("c{i}"), "h3", &[&ip], &[("role", "client")]));
    }
    let d2 = setup(many).unwrap();
    assert_eq!(d.skeleton, d2.skeleton);
    assert_eq!(d2.shape.rules, d.shape.rules);
    let diff = plan(Some(&d), Some(&d2));
    assert!(
        diff.starts_with("delete element inet ferrynet-policy e_"),
        "{diff}"
    );
    assert!(!diff.contains("chain"), "{diff}");
    assert!(plan(None, Some(&d2)).starts_with("table inet ferrynet-policy {}\ndelete table"));
}

#[test]
fn no_selected_local_endpoint_no_table() {
    assert!(setup(vec![ep("web", "h2", &["10.0.0.2"], &[("app", "web")])]).is_none());
    assert_eq!(plan(None, None), delete_table());
}

#[test]
fn plain_blocks_of_adjacent_rules_share_one_lookup() {
    let mut text = String::from("name: many\nselector: app=web\ningress:\n");
    for i in 0..300u32 {
        text += &format!(
            "- from: [{{cidr: 10.{}.{}.0/24}}]\n  ports: [tcp/80]\n",
            i / 256,
            i % 256
        );
    }
    text += "- from: [{cidr: \"fd00::/64\"}, {cidr: 192.0.2.0/24, except: [192.0.2.1/32]}]\n  ports: [tcp/80]\n";
    let book = PolicyBook::new(parse_documents(&text).unwrap(), Default::default());
    let eps = EndpointIndex::new(vec![ep("web", "h1", &["10.9.0.2"], &[("app", "web")])]);
    let d = desired(&book, &eps, &|_| true).unwrap();
    // 300 /24s aggregate into two blocks, one rule; the IPv6 block and the block with a hole
    // keep rules of their own.
    assert!(d.skeleton.contains("ip saddr { 10.0.0.0/16, 10.1.0.0/19, 10.1.32.0/21, 10.1.40.0/22 } meta l4proto tcp th dport { 80 } accept"), "{}", d.skeleton);
    assert_eq!(d.shape.rules, 3, "{}", d.skeleton);
}
