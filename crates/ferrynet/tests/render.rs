//! `ferrynet render` and `ferrynet kv` as real processes over a real store: the embedded file
//! in a temporary state directory (no network traffic at all), and one test on a real etcd on
//! loopback. Records are written with the Store API, as the registry would write them.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrynet_model::portmap::Protocol;
use ferrynet_model::service::{keys, Producer, Service, ServicePort};
use ferrynet_store::testing::EtcdServer;
use ferrynet_store::{EmbeddedStore, Store};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrynet")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A state directory, a store, and the files of one test; removed on drop.
struct Env {
    dir: tempfile::TempDir,
    /// The etcd the processes use; None: the embedded file of the state directory.
    etcd: Option<EtcdServer>,
    rt: tokio::runtime::Runtime,
    store: Arc<dyn Store>,
}

impl Env {
    fn embedded() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("state/store.redb");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        // Other processes share the file: every operation takes its lock.
        let store = Arc::new(EmbeddedStore::open(&file).expect("opening the store"));
        Env {
            dir,
            etcd: None,
            rt: runtime(),
            store,
        }
    }

    fn etcd() -> Env {
        let server =
            EtcdServer::start().unwrap_or_else(|e| panic!("cannot start a test etcd: {e}"));
        // The client is bound to the runtime that made it: the one every call here uses.
        let rt = runtime();
        let store = Arc::new(rt.block_on(server.connect()).expect("connecting to etcd"));
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
            etcd: Some(server),
            rt,
            store,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Put a JSON record; the revision.
    fn put<T: serde::Serialize>(&self, key: &str, v: &T) -> u64 {
        let s = &self.store;
        self.rt
            .block_on(s.put(key, serde_json::to_vec(v).unwrap()))
            .expect("put")
    }

    fn put_raw(&self, key: &str, v: &[u8]) -> u64 {
        let s = &self.store;
        self.rt.block_on(s.put(key, v.to_vec())).expect("put")
    }

    fn delete(&self, key: &str) {
        let s = &self.store;
        assert!(self.rt.block_on(s.delete(key)).expect("delete"), "{key}");
    }

    /// A ferrynet command on this store (no agent, no host.json: FERRYNET_HOST names the host).
    fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--state-dir")
            .arg(self.path("state"))
            .env_remove("FERRYNET_STORE")
            .env("FERRYNET_HOST", "hosta")
            .env("FERRYNET_LOG", "info,ferrynet=debug");
        if let Some(s) = &self.etcd {
            c.arg("--store").arg(&s.url);
        }
        c
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("running ferrynet")
    }

    /// Start `ferrynet render ARGS` in the background, its log in `render.log`.
    fn render(&self, args: &[&str]) -> Render {
        let log = self.path("render.log");
        let f = fs::File::create(&log).unwrap();
        let child = self
            .cmd()
            .arg("render")
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("starting ferrynet render");
        Render { child, log }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A running `ferrynet render`, killed (by its PID) when the test ends.
struct Render {
    child: Child,
    log: PathBuf,
}

impl Render {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
    /// The highest revision of a "FILE: unchanged (revision N)" line.
    fn unchanged_at(&self, out: &Path) -> Option<u64> {
        let tag = format!("{}: unchanged (revision ", out.display());
        self.log()
            .lines()
            .filter_map(|l| l.split_once(&tag))
            .filter_map(|(_, rest)| rest.trim_end_matches(')').parse().ok())
            .max()
    }
}

impl Drop for Render {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait (generously) until `f` holds; panic with `ctx()` when it never does.
fn wait_for(what: &str, ctx: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > Duration::from_secs(30) {
            panic!("{what}: not within 30 s\n{}", ctx());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn web() -> Service {
    Service {
        name: "web".into(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        vips: vec!["10.96.0.10".parse().unwrap()],
        networks: vec![],
        ingress: vec![],
        affinity: false,
        check: None,
    }
}

/// A producer not tied to a host or check, so it is healthy as soon as it exists.
fn producer(id: &str, ip: &str, port: u16) -> Producer {
    Producer {
        service: "web".into(),
        id: id.into(),
        host: None,
        network: None,
        container: None,
        netns: None,
        addrs: vec![ip.parse().unwrap()],
        ports: BTreeMap::from([(80, port)]),
        check: None,
    }
}

fn lines(p: &Path) -> usize {
    fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// An nginx-style upstream list, padded to ~60 KB so a torn write would be visible to a reader.
const UPSTREAMS: &str = r#"# BEGIN
{% for s in services %}
upstream {{ s.name }} {
  {% for p in s.producers|sort_by('addr') %}
  server {{ p.addr }}:{{ p.ports.http }};
  {% endfor %}
}
{% endfor %}
{% for i in range(3000) %}
# padding {{ i }}
{% endfor %}
# END
"#;

#[test]
fn producers_change_the_file_atomically_and_reload_once_per_change() {
    let env = Env::embedded();
    env.put(&keys::service("web"), &web());
    env.put(
        &keys::producer("web", "w1"),
        &producer("w1", "10.20.0.2", 8080),
    );
    let tpl = env.path("upstreams.tmpl");
    fs::write(&tpl, UPSTREAMS).unwrap();
    let out = env.path("out/upstreams.conf");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    let count = env.path("reloads");
    let exec = format!("echo reload >> {}", count.display());
    let mut r = env.render(&[
        "--template",
        tpl.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--exec",
        &exec,
    ]);
    let content = || fs::read_to_string(&out).unwrap_or_default();
    wait_for(
        "first render and reload",
        || r.log(),
        || content().contains("server 10.20.0.2:8080;") && lines(&count) == 1,
    );
    assert!(content().starts_with("# BEGIN\nupstream web {\n  server 10.20.0.2:8080;\n}\n"));

    // The new file must keep these.
    fs::set_permissions(&out, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&out, Some(4242), Some(4243)).unwrap();
    let ino1 = fs::metadata(&out).unwrap().ino();

    // A reader polling the file meanwhile only ever sees whole files.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, out) = (stop.clone(), out.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let s = fs::read_to_string(&out).expect("the file is always there");
                assert!(
                    s.starts_with("# BEGIN\n") && s.ends_with("# padding 2999\n# END\n"),
                    "a torn read of {} bytes",
                    s.len()
                );
                reads += 1;
            }
            reads
        })
    };

    env.put(
        &keys::producer("web", "w2"),
        &producer("w2", "10.20.0.3", 8081),
    );
    wait_for(
        "the added producer rendered and reloaded",
        || r.log(),
        || content().contains("server 10.20.0.3:8081;") && lines(&count) == 2,
    );
    let m = fs::metadata(&out).unwrap();
    assert_ne!(m.ino(), ino1, "replaced by a rename, not written in place");
    assert_eq!(m.mode() & 0o7777, 0o640, "mode kept");
    assert_eq!((m.uid(), m.gid()), (4242, 4243), "owner kept");
    assert!(content().contains("  server 10.20.0.2:8080;\n  server 10.20.0.3:8081;\n"));
    let ino2 = m.ino();

    // Changes that do not change the output: an unused key, the same record written again.
    let rev1 = env.put_raw(&keys::kv("unused"), b"x");
    let rev2 = env.put(
        &keys::producer("web", "w2"),
        &producer("w2", "10.20.0.3", 8081),
    );
    assert!(rev2 > rev1);
    wait_for(
        "both changes rendered (to the same content)",
        || r.log(),
        || r.unchanged_at(&out).is_some_and(|rev| rev >= rev2),
    );
    assert_eq!(lines(&count), 2, "no reload without a change");
    assert_eq!(fs::metadata(&out).unwrap().ino(), ino2, "not rewritten");

    env.delete(&keys::producer("web", "w1"));
    wait_for(
        "the removed producer gone and reloaded",
        || r.log(),
        || !content().contains("10.20.0.2") && lines(&count) == 3,
    );
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw only whole files");
    assert!(reads > 0);
    assert!(r.alive(), "{}", r.log());
    assert_eq!(lines(&count), 3, "exactly one reload per change");
    let left: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "no temporary files left: {left:?}");
}

#[test]
fn kv_keys_and_a_failing_template_in_watch_mode() {
    let env = Env::embedded();
    let o = env.cli(&["kv", "put", "motd", "hello"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = env.cli(&["kv", "get", "motd"]);
    assert_eq!(text(&o), "hello\n");
    let o = env.cli(&["kv", "ls"]);
    assert!(
        text(&o).contains("motd") && text(&o).contains("hello"),
        "{}",
        text(&o)
    );
    let o = env.cli(&["kv", "ls", "--json"]);
    let m: BTreeMap<String, String> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["motd"], "hello");
    let mut put = env
        .cmd()
        .args(["kv", "put", "multi"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut put.stdin.take().unwrap(), b"line 1\nline 2\n").unwrap();
    let o = put.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&env.cli(&["kv", "get", "multi"])), "line 1\nline 2\n");
    let o = env.cli(&["kv", "put", "/bad", "x"]);
    assert!(
        !o.status.success() && text(&o).contains("key name"),
        "{}",
        text(&o)
    );

    let tpl = env.path("motd.tmpl");
    fs::write(&tpl, "host={{ host }}\nmotd={{ key('motd') }}\n").unwrap();
    let out = env.path("motd");
    let count = env.path("reloads");
    // The reload command fails every time: logged, and rendering goes on.
    let exec = format!("echo reload >> {}; exit 3", count.display());
    let spec = format!("{}:{}", tpl.display(), out.display());
    let mut r = env.render(&["-t", &spec, "--exec", &exec]);
    let content = || fs::read_to_string(&out).unwrap_or_default();
    wait_for(
        "first render",
        || r.log(),
        || content() == "host=hosta\nmotd=hello\n" && lines(&count) == 1,
    );
    wait_for(
        "the failed reload logged",
        || r.log(),
        || r.log().contains("exit status: 3"),
    );

    // The key the template needs goes away: a clear error, the last good file stays.
    let o = env.cli(&["kv", "rm", "motd"]);
    assert!(o.status.success(), "{}", text(&o));
    let want = format!("template {}, line 2: ", tpl.display());
    wait_for(
        "the template error logged",
        || r.log(),
        || r.log().contains(&want) && r.log().contains("kv key \"motd\" is not set"),
    );
    assert_eq!(
        content(),
        "host=hosta\nmotd=hello\n",
        "last good output kept"
    );
    assert!(r.alive(), "{}", r.log());

    let o = env.cli(&["kv", "put", "motd", "bye"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for(
        "rendering resumed",
        || r.log(),
        || content() == "host=hosta\nmotd=bye\n" && lines(&count) == 2,
    );
    assert_eq!(lines(&count), 2, "no reload for the failed render");

    let o = env.cli(&["kv", "rm", "nope"]);
    assert!(
        !o.status.success() && text(&o).contains("not set"),
        "{}",
        text(&o)
    );
    let o = env.cli(&["kv", "get", "nope"]);
    assert!(!o.status.success(), "{}", text(&o));
}

/// What `sh` sees after sourcing an env file.
fn sourced(file: &Path, var: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(". {} && printf %s \"${var}\"", file.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn env_files_builtin_and_from_a_template() {
    let env = Env::embedded();
    env.put(&keys::service("web"), &web());
    env.put(
        &keys::producer("web", "w1"),
        &producer("w1", "10.20.0.2", 8080),
    );
    env.put(
        &keys::producer("web", "w2"),
        &producer("w2", "10.20.0.3", 8081),
    );
    let out = env.path("web.env");
    let o = env.cli(&[
        "render",
        "--once",
        "--format",
        "env",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = fs::read_to_string(&out).unwrap();
    for line in [
        "FERRYNET_HOST=hosta\n",
        "WEB_VIP=10.96.0.10\n",
        "WEB_PORT=80\n",
        "WEB_HTTP_PORT=80\n",
        "WEB_ADDRS=10.20.0.2:8080,10.20.0.3:8081\n",
        "WEB_COUNT=2\n",
    ] {
        assert!(s.contains(line), "{line:?} missing from\n{s}");
    }
    assert_eq!(sourced(&out, "WEB_IPS"), "10.20.0.2,10.20.0.3");

    // Raw values from a template come out quoted so sh reads them back unchanged.
    let tricky = "it's \"quoted\" $HOME `id` \\ ; done";
    env.put_raw(&keys::kv("greeting"), tricky.as_bytes());
    let tpl = env.path("app.env.tmpl");
    fs::write(
        &tpl,
        "# for the app\nGREETING={{ key('greeting') }}\nWEB={{ service('web').vip }}:{{ service('web').port }}\n",
    )
    .unwrap();
    let out2 = env.path("app.env");
    let spec = format!("{}:{}", tpl.display(), out2.display());
    let o = env.cli(&["render", "--once", "--format", "env", "-t", &spec]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sourced(&out2, "GREETING"), tricky);
    assert_eq!(sourced(&out2, "WEB"), "10.96.0.10:80");

    // A line that is not KEY=VALUE is an error naming the line.
    fs::write(&tpl, "A=1\n{{ 'not an assignment' }}\n").unwrap();
    let o = env.cli(&["render", "--once", "--format", "env", "-t", &spec]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("template {}: env output line 2", tpl.display())),
        "{}",
        text(&o)
    );
    assert_eq!(sourced(&out2, "WEB"), "10.96.0.10:80", "left as it was");
}

#[test]
fn once_reports_template_errors_and_runs_the_reload_only_on_change() {
    let env = Env::embedded();
    env.put(&keys::service("web"), &web());
    let out = env.path("out.txt");
    let o_ = out.to_str().unwrap();

    let missing = env.path("missing.tmpl");
    let o = env.cli(&[
        "render",
        "--once",
        "-t",
        missing.to_str().unwrap(),
        "-o",
        o_,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!("reading template {}", missing.display()))
            && text(&o).contains("No such file"),
        "{}",
        text(&o)
    );

    let tpl = env.path("t.tmpl");
    let t_ = tpl.to_str().unwrap();
    fs::write(&tpl, "a\nb\n{% for s in %}\n").unwrap();
    let o = env.cli(&["render", "--once", "-t", t_, "-o", o_]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!("template {t_}, line 3: syntax error")),
        "{}",
        text(&o)
    );

    fs::write(&tpl, "{{ services.web.vip }}\n{{ services.web.typo }}\n").unwrap();
    let o = env.cli(&["render", "--once", "-t", t_, "-o", o_]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!("template {t_}, line 2: undefined value")),
        "{}",
        text(&o)
    );
    assert!(!out.exists(), "nothing written on error");

    fs::write(&tpl, "vip={{ services.web.vip }}\n").unwrap();
    let count = env.path("reloads");
    let exec = format!("echo reload >> {}", count.display());
    let o = env.cli(&["render", "--once", "-t", t_, "-o", o_, "--exec", &exec]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(fs::read_to_string(&out).unwrap(), "vip=10.96.0.10\n");
    assert_eq!(fs::metadata(&out).unwrap().mode() & 0o777, 0o644);
    assert_eq!(lines(&count), 1);
    let ino = fs::metadata(&out).unwrap().ino();
    let o = env.cli(&["render", "--once", "-t", t_, "-o", o_, "--exec", &exec]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(lines(&count), 1, "same content: no reload");
    assert_eq!(
        fs::metadata(&out).unwrap().ino(),
        ino,
        "same content: not rewritten"
    );

    // A failing reload makes --once fail (after writing).
    fs::write(
        &tpl,
        "vip={{ services.web.vip }} port={{ services.web.port }}\n",
    )
    .unwrap();
    let o = env.cli(&["render", "--once", "-t", t_, "-o", o_, "--exec", "exit 7"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("reload command"), "{}", text(&o));
    assert_eq!(
        fs::read_to_string(&out).unwrap(),
        "vip=10.96.0.10 port=80\n"
    );
}

#[test]
fn etcd_watch_with_wait_renders_a_burst_once() {
    let env = Env::etcd();
    env.put(&keys::service("web"), &web());
    let tpl = env.path("t.tmpl");
    fs::write(
        &tpl,
        "{% for p in producers('web')|sort_by('addr') %}{{ p.addr }}:{{ p.port }}\n{% endfor %}",
    )
    .unwrap();
    let out = env.path("out.txt");
    let count = env.path("reloads");
    let exec = format!("echo reload >> {}", count.display());
    let spec = format!("{}:{}", tpl.display(), out.display());
    let r = env.render(&["-t", &spec, "--exec", &exec, "--wait", "2s:20s"]);
    let content = || fs::read_to_string(&out).ok();
    // No producers yet: an empty file, written once.
    wait_for(
        "first render",
        || r.log(),
        || content().as_deref() == Some("") && lines(&count) == 1,
    );

    // Five producers in quick succession (well inside the 2 s quiet time): one rewrite.
    for i in 0..5u16 {
        env.put(
            &keys::producer("web", &format!("w{i}")),
            &producer(&format!("w{i}"), &format!("10.20.0.{}", 10 + i), 8080 + i),
        );
    }
    let want: String = (0..5u16)
        .map(|i| format!("10.20.0.{}:{}\n", 10 + i, 8080 + i))
        .collect();
    wait_for(
        "the burst rendered",
        || r.log(),
        || content().as_deref() == Some(want.as_str()) && lines(&count) == 2,
    );
    assert_eq!(
        r.log().matches(": written (").count(),
        2,
        "one write for the burst\n{}",
        r.log()
    );
}

#[test]
fn services_registered_with_the_cli_render_their_healthy_producers() {
    let env = Env::embedded();
    let must = |args: &[&str]| {
        let o = env.cli(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    };
    must(&[
        "service",
        "register",
        "api",
        "--port",
        "http=80",
        "--vip",
        "10.96.7.7",
        "--addr",
        "10.30.0.2",
        "--id",
        "a1",
        "--host",
        "none",
        "--target",
        "80:8080",
    ]);
    // On host `hosta`, whose agent is not running: registered, but not healthy.
    must(&[
        "service",
        "register",
        "api",
        "--addr",
        "10.30.0.3",
        "--id",
        "a2",
    ]);
    let tpl = env.path("api.tmpl");
    fs::write(
        &tpl,
        r#"{% set api = service("api") %}
api {{ api.vip }}:{{ api.port }} ->{% for p in api.producers %} {{ p.addr }}:{{ p.port }}{% endfor %}

{% for p in all_producers|sort_by("id") %}
{{ p.id }} healthy={{ p.healthy }}
{% endfor %}
"#,
    )
    .unwrap();
    let out = env.path("api.txt");
    let spec = format!("{}:{}", tpl.display(), out.display());
    let r = env.render(&["-t", &spec]);
    let content = || fs::read_to_string(&out).unwrap_or_default();
    let only_a1 = "api 10.96.7.7:80 -> 10.30.0.2:8080\na1 healthy=true\na2 healthy=false\n";
    wait_for("first render", || r.log(), || content() == only_a1);

    // hosta's agent registers: a2's host is live, so a2 takes traffic and is rendered.
    env.put_raw(&ferrynet_model::network::keys::host("hosta"), b"{}");
    let both =
        "api 10.96.7.7:80 -> 10.30.0.2:8080 10.30.0.3:80\na1 healthy=true\na2 healthy=true\n";
    wait_for(
        "a2 healthy",
        || format!("{}\n{}", content(), r.log()),
        || content() == both,
    );

    must(&["service", "deregister", "api", "--id", "a1"]);
    let only_a2 = "api 10.96.7.7:80 -> 10.30.0.3:80\na2 healthy=true\n";
    wait_for(
        "a1 deregistered",
        || format!("{}\n{}", content(), r.log()),
        || content() == only_a2,
    );
}

#[test]
fn sighup_reads_the_templates_again() {
    let env = Env::embedded();
    let tpl = env.path("t.tmpl");
    fs::write(&tpl, "v1 {{ host }}\n").unwrap();
    let out = env.path("t.txt");
    let spec = format!("{}:{}", tpl.display(), out.display());
    let mut r = env.render(&["-t", &spec]);
    let content = || fs::read_to_string(&out).unwrap_or_default();
    // Only after the first render is the handler surely installed (SIGHUP would end it before).
    wait_for("first render", || r.log(), || content() == "v1 hosta\n");
    let hup = |r: &Render| {
        let o = Command::new("kill")
            .args(["-HUP", &r.child.id().to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    };

    fs::write(&tpl, "v2 {{ host }}\n").unwrap();
    hup(&r);
    wait_for(
        "the edited template rendered",
        || r.log(),
        || content() == "v2 hosta\n",
    );

    // A broken edit is refused; the templates in use stay and the process goes on.
    fs::write(&tpl, "{% if %}\n").unwrap();
    hup(&r);
    let want = format!("SIGHUP: template {}, line 1: syntax error", tpl.display());
    wait_for(
        "the refused edit logged",
        || r.log(),
        || r.log().contains(&want),
    );
    assert!(r.alive(), "{}", r.log());
    let rev = env.put_raw(&keys::kv("any"), b"x");
    wait_for(
        "still rendering with v2",
        || r.log(),
        || r.unchanged_at(&out).is_some_and(|n| n >= rev),
    );
    assert_eq!(content(), "v2 hosta\n");
}
