//! etcd with `auth enable`: ferrynet logs in with a user and password (from the URL or a
//! password file); a wrong password fails at connect with an error that says so and does not
//! show the password; without a login, or outside the role's prefix, nothing is written.

use std::time::Duration;

use etcd_client::{Client, Permission};
use ferrynet_store::testing::EtcdServer;
use ferrynet_store::{EtcdConfig, EtcdStore, Store, StoreConfig};

const USER: &str = "ferry";
const PASSWORD: &str = "S3cret-Pw";

/// Root user, a `ferrynet` role with read-write on `/ferrynet/` only, user `ferry` holding it;
/// then authentication on.
async fn enable_auth(server: &EtcdServer) {
    let mut admin = Client::connect([format!("http://{}", server.endpoint)], None)
        .await
        .expect("admin client");
    admin.user_add("root", "r00t-pw", None).await.expect("root");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("root role");
    admin.role_add("ferrynet").await.expect("role");
    admin
        .role_grant_permission(
            "ferrynet",
            Permission::read_write("/ferrynet/").with_prefix(),
        )
        .await
        .expect("grant");
    admin.user_add(USER, PASSWORD, None).await.expect("user");
    admin
        .user_grant_role(USER, "ferrynet")
        .await
        .expect("user role");
    admin.auth_enable().await.expect("auth enable");
}

fn config(url: &str) -> EtcdConfig {
    match url.parse::<StoreConfig>().expect("store url") {
        StoreConfig::Etcd(c) => EtcdConfig {
            timeout: Duration::from_secs(3),
            ..c
        },
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn etcd_user_and_password() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("cannot start a test etcd: {e}"));
    enable_auth(&server).await;
    let ep = &server.endpoint;

    // The right password, in the URL: reads and writes under the role's prefix.
    let store = EtcdStore::connect(&config(&format!("etcd://{USER}:{PASSWORD}@{ep}")))
        .await
        .expect("login with the right password");
    store
        .put("/ferrynet/v1/probe", b"1".to_vec())
        .await
        .expect("put");
    assert!(store
        .get("/ferrynet/v1/probe")
        .await
        .expect("get")
        .is_some());
    // The role is per prefix: outside it, nothing.
    assert!(store.put("/other/x", b"1".to_vec()).await.is_err());

    // The right password from a file (the form a config file should use).
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("etcd.pw");
    std::fs::write(&file, format!("{PASSWORD}\n")).expect("write password file");
    let url = format!("etcd://{USER}@{ep}?password-file={}", file.display());
    let from_file = EtcdStore::connect(&config(&url))
        .await
        .expect("login with the password file");
    assert!(from_file
        .get("/ferrynet/v1/probe")
        .await
        .expect("get")
        .is_some());

    // The environment supplies what the URL lacks.
    let env = config(&format!("etcd://{ep}")).with_env_credentials(|k| match k {
        "FERRYNET_ETCD_USER" => Some(USER.into()),
        "FERRYNET_ETCD_PASSWORD" => Some(PASSWORD.into()),
        _ => None,
    });
    let from_env = EtcdStore::connect(&env).await.expect("login from env");
    assert!(from_env
        .get("/ferrynet/v1/probe")
        .await
        .expect("get")
        .is_some());

    // A wrong password: refused at connect, clearly, without echoing it.
    let wrong = "Wr0ng-Guess";
    let e = EtcdStore::connect(&config(&format!("etcd://{USER}:{wrong}@{ep}")))
        .await
        .expect_err("a wrong password must not log in")
        .to_string();
    assert!(e.contains("could not log in"), "{e}");
    assert!(e.contains(USER), "{e}");
    assert!(!e.contains(wrong), "the error shows the password: {e}");

    // No login at all: etcd refuses the write.
    let anon = EtcdStore::connect(&config(&format!("etcd://{ep}")))
        .await
        .expect("a client without a user connects lazily");
    assert!(anon.put("/ferrynet/v1/x", b"1".to_vec()).await.is_err());
    assert!(anon.get("/ferrynet/v1/probe").await.is_err());

    // A user without any password is a configuration error, not a login attempt.
    let e = EtcdStore::connect(&config(&format!("etcd://{USER}@{ep}")))
        .await
        .expect_err("no password")
        .to_string();
    assert!(e.contains("has no password"), "{e}");
}
