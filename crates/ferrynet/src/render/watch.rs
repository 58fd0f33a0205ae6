//! The render job: per new discovery view, render every template, write the files whose
//! content changed, then run the reload command once. Watch mode follows the store through the
//! cluster feed (`crate::feed`); `--once` renders one snapshot.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_store::Store;

use super::context::{self, RenderContext};
use super::envfile;
use super::output;
use super::template::Template;
use crate::feed::{self, ViewRx};

/// What the output file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The template's output as it is.
    Text,
    /// `KEY=VALUE` lines with quoted values (from the template, or the built-in set).
    Env,
}

/// Debouncing of bursts: render once the store was quiet for `min`, or `max` after the first
/// change at the latest (consul-template's `wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Quiet time before rendering.
    pub min: Duration,
    /// Longest delay after the first change.
    pub max: Duration,
}

/// One output file and what fills it.
#[derive(Debug)]
pub struct Target {
    /// The file written.
    pub out: PathBuf,
    /// The template file, read again on SIGHUP; `None`: the built-in env file.
    pub source: Option<PathBuf>,
    /// Its compiled template.
    pub template: Option<Template>,
}

impl Target {
    /// A target rendering the template file `source` into `out`.
    pub fn load(source: PathBuf, out: PathBuf) -> anyhow::Result<Target> {
        let name = source.display().to_string();
        let text =
            std::fs::read_to_string(&source).with_context(|| format!("reading template {name}"))?;
        Ok(Target {
            out,
            template: Some(Template::new(&name, text)?),
            source: Some(source),
        })
    }

    /// The built-in env file into `out`.
    pub fn builtin_env(out: PathBuf) -> Target {
        Target {
            out,
            source: None,
            template: None,
        }
    }
}

/// A render job as the command line describes it.
#[derive(Debug)]
pub struct Job {
    /// The files to keep rendered.
    pub targets: Vec<Target>,
    /// Text or env file.
    pub format: Format,
    /// Command run with `sh -c` after a round that changed a file.
    pub exec: Option<String>,
    /// How long the command may run before it is killed.
    pub exec_timeout: Duration,
    /// Debouncing (watch mode).
    pub wait: Option<Wait>,
    /// This host's name (the `host` global).
    pub host: String,
}

/// What one round did.
#[derive(Debug, Default)]
pub struct Round {
    /// Files rewritten.
    pub written: Vec<PathBuf>,
    /// Failures (templates, writes), each naming its file.
    pub errors: Vec<String>,
}

impl Job {
    /// The content of one target for `ctx`.
    pub fn content(&self, t: &Target, ctx: &RenderContext) -> anyhow::Result<String> {
        let text = match &t.template {
            Some(tpl) => tpl.render(ctx)?,
            None => return Ok(envfile::format(&envfile::default_pairs(ctx))),
        };
        match self.format {
            Format::Text => Ok(text),
            Format::Env => {
                let pairs =
                    envfile::parse(&text).with_context(|| format!("template {}", tpl_name(t)))?;
                Ok(envfile::format(&pairs))
            }
        }
    }

    /// Read every template file again; on any failure nothing changes.
    pub fn reread(&mut self) -> anyhow::Result<()> {
        let mut fresh = Vec::with_capacity(self.targets.len());
        for t in &self.targets {
            fresh.push(match &t.source {
                Some(src) => Target::load(src.clone(), t.out.clone())?,
                None => Target::builtin_env(t.out.clone()),
            });
        }
        self.targets = fresh;
        Ok(())
    }

    /// Render every target for `view` and write those that changed.
    pub fn round(&self, view: &DiscoveryView) -> Round {
        let ctx = context::build(view, &self.host);
        let mut r = Round::default();
        for t in &self.targets {
            let out = t.out.display();
            let text = match self.content(t, &ctx) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("{e:#}; {out} keeps its last good content");
                    r.errors.push(format!("{e:#}"));
                    continue;
                }
            };
            match output::write_if_changed(&t.out, text.as_bytes()) {
                Ok(true) => {
                    tracing::info!(
                        "{out}: written ({} bytes, revision {})",
                        text.len(),
                        ctx.revision
                    );
                    r.written.push(t.out.clone());
                }
                Ok(false) => tracing::debug!("{out}: unchanged (revision {})", ctx.revision),
                Err(e) => {
                    tracing::error!("writing {out}: {e}");
                    r.errors.push(format!("writing {out}: {e}"));
                }
            }
        }
        r
    }

    /// Run the reload command; its exit status.
    async fn reload(&self, cmd: &str) -> anyhow::Result<ExitStatus> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting sh for the reload command")?;
        match tokio::time::timeout(self.exec_timeout, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = child.kill().await;
                bail!("killed after {:?}", self.exec_timeout)
            }
        }
    }

    /// Run the reload command after a round that wrote files; false when it failed.
    async fn after(&self, round: &Round) -> bool {
        let Some(cmd) = &self.exec else { return true };
        if round.written.is_empty() {
            return true;
        }
        match self.reload(cmd).await {
            Ok(s) if s.success() => {
                tracing::info!("reload command {cmd:?} exited 0");
                true
            }
            Ok(s) => {
                tracing::warn!("reload command {cmd:?} failed: {s}");
                false
            }
            Err(e) => {
                tracing::warn!("reload command {cmd:?} failed: {e:#}");
                false
            }
        }
    }

    /// Render one snapshot of the store; an error when a template, a write or the reload
    /// command failed.
    pub async fn once(&self, store: Arc<dyn Store>) -> anyhow::Result<()> {
        let view = feed::snapshot(store.as_ref())
            .await
            .context("reading the store")?;
        let round = self.round(&view);
        let reloaded = self.after(&round).await;
        if !round.errors.is_empty() {
            bail!("{}", round.errors.join("; "));
        }
        if !reloaded {
            bail!("the reload command failed");
        }
        Ok(())
    }

    /// Keep the files rendered until SIGTERM or SIGINT: one round per new view (after `wait`);
    /// SIGHUP reads the template files again and renders them.
    pub async fn watch(&mut self, store: Arc<dyn Store>) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, mut rx) = feed::channel();
        tokio::spawn(feed::follow(store, feed::Subscribers::views(tx)));
        let stop = shutdown();
        tokio::pin!(stop);
        let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
        // The channel's first value is an empty placeholder, not the store.
        let mut have_view = false;
        loop {
            tokio::select! {
                r = rx.changed() => {
                    r.context("the discovery feed ended")?;
                    have_view = true;
                }
                _ = hup.recv() => {
                    match self.reread() {
                        Ok(()) => tracing::info!("SIGHUP: templates read again"),
                        Err(e) => {
                            tracing::error!("SIGHUP: {e:#}; keeping the templates in use");
                            continue;
                        }
                    }
                    if !have_view {
                        continue;
                    }
                }
                r = &mut stop => return r,
            }
            if let Some(w) = self.wait {
                tokio::select! {
                    () = settle(&mut rx, w) => {}
                    r = &mut stop => return r,
                }
            }
            let view = rx.borrow_and_update().clone();
            let round = self.round(&view);
            self.after(&round).await;
        }
    }
}

fn tpl_name(t: &Target) -> &str {
    t.template.as_ref().map_or("(built-in)", |t| t.name())
}

/// Wait until the feed was quiet for `w.min`, at most `w.max`.
async fn settle(rx: &mut ViewRx, w: Wait) {
    let hard = tokio::time::Instant::now() + w.max;
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = tokio::time::sleep(w.min) => return,
            () = tokio::time::sleep_until(hard) => return,
        }
    }
}

async fn shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    Ok(())
}
