//! Running nftables transactions. A batch (nft's own syntax, as `nft -f` reads it) is applied
//! atomically: all of it or none.
//!
//! The default executor calls libnftables in-process (loaded at run time, so there is no build
//! dependency on its headers): no process spawn per transaction, which is most of an `nft` call's
//! cost. The `nft` binary is the fallback. Both act in the calling thread's network namespace.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::Write;
use std::process::{Command, Stdio};

pub use crate::nft_netlink::NamedCounter;

/// nftables failures.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// libnftables could not be loaded.
    #[error("cannot load libnftables: {0}")]
    Load(String),
    /// nft rejected the batch; the text is nft's own message.
    #[error("nftables: {0}")]
    Command(String),
    /// Spawning or talking to `nft` failed.
    #[error("running nft: {0}")]
    Io(#[from] std::io::Error),
}

/// Something that applies nft batches.
pub trait NftExecutor: Send + Sync {
    /// Apply a batch atomically.
    fn apply(&self, batch: &str) -> Result<(), NftError>;
    /// The JSON listing of a table, or None if it does not exist.
    fn list_table(&self, family: &str, table: &str) -> Result<Option<serde_json::Value>, NftError>;
    /// A table's named counters, (name, packets, bytes) by name, or None if the table does not
    /// exist. Asked of the kernel over netlink: cheap whatever the size of the table's sets
    /// (see [`crate::nft_netlink`]).
    fn list_counters(
        &self,
        family: &str,
        table: &str,
    ) -> Result<Option<Vec<NamedCounter>>, NftError> {
        crate::nft_netlink::counters(family, table)
    }
    /// True when table `family table` exists. Asked of the kernel over netlink, like
    /// [`NftExecutor::chain_exists`].
    fn table_exists(&self, family: &str, table: &str) -> Result<bool, NftError> {
        crate::nft_netlink::table_exists(family, table)
    }
    /// True when chain `chain` of table `family table` exists. Asked of the kernel over
    /// netlink: cheap whatever the size of the table (a listing through libnftables reads the
    /// whole ruleset, every set element included).
    fn chain_exists(&self, family: &str, table: &str, chain: &str) -> Result<bool, NftError> {
        crate::nft_netlink::chain_exists(family, table, chain)
    }
    /// Which executor this is, for logs.
    fn name(&self) -> &'static str;
    /// Apply a batch, however small, that touches large kernel state (sets of tens of thousands
    /// of elements): libnftables reads that state into its cache to check the batch, so an
    /// executor that can hands it to a short-lived process instead of its caller's heap.
    fn apply_touching_large_sets(&self, batch: &str) -> Result<(), NftError> {
        self.apply(batch)
    }
}

/// Called after every batch with its duration and whether it applied (the agent's metrics).
pub type BatchObserver = fn(std::time::Duration, bool);

static BATCH_OBSERVER: std::sync::OnceLock<BatchObserver> = std::sync::OnceLock::new();

/// Report every batch's duration and outcome to `f` (set once per process; later calls are
/// ignored).
pub fn set_batch_observer(f: BatchObserver) {
    let _ = BATCH_OBSERVER.set(f);
}

fn observed(f: impl FnOnce() -> Result<(), NftError>) -> Result<(), NftError> {
    let started = std::time::Instant::now();
    let r = f();
    if let Some(obs) = BATCH_OBSERVER.get() {
        obs(started.elapsed(), r.is_ok());
    }
    r
}

/// A listing's JSON, None when nft said the table does not exist.
fn listing(ok: bool, out: &str, err: &str) -> Result<Option<serde_json::Value>, NftError> {
    if !ok {
        return if err.contains("No such file") {
            Ok(None)
        } else {
            Err(NftError::Command(err.trim().to_string()))
        };
    }
    serde_json::from_str(out)
        .map(Some)
        .map_err(|e| NftError::Command(format!("unreadable nft JSON: {e}")))
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuf = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// `NFT_CTX_OUTPUT_JSON` from libnftables.h.
const OUTPUT_JSON: c_uint = 1 << 4;

/// libnftables, called in-process.
pub struct LibNftables {
    _lib: libloading::Library,
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    get_output: CtxGetBuf,
    get_error: CtxGetBuf,
    set_output_flags: CtxSetFlags,
    run_cmd: RunCmd,
}

impl LibNftables {
    /// Load `libnftables.so.1`.
    pub fn load() -> Result<LibNftables, NftError> {
        // SAFETY: loading a system library whose initialisers have no preconditions; each
        // symbol is read with the C signature documented in libnftables(3).
        unsafe {
            let lib = libloading::Library::new("libnftables.so.1")
                .map_err(|e| NftError::Load(e.to_string()))?;
            macro_rules! sym {
                ($n:literal, $t:ty) => {
                    *lib.get::<$t>($n)
                        .map_err(|e| NftError::Load(e.to_string()))?
                };
            }
            Ok(LibNftables {
                ctx_new: sym!(b"nft_ctx_new\0", CtxNew),
                ctx_free: sym!(b"nft_ctx_free\0", CtxFree),
                buffer_output: sym!(b"nft_ctx_buffer_output\0", CtxInt),
                buffer_error: sym!(b"nft_ctx_buffer_error\0", CtxInt),
                get_output: sym!(b"nft_ctx_get_output_buffer\0", CtxGetBuf),
                get_error: sym!(b"nft_ctx_get_error_buffer\0", CtxGetBuf),
                set_output_flags: sym!(b"nft_ctx_output_set_flags\0", CtxSetFlags),
                run_cmd: sym!(b"nft_run_cmd_from_buffer\0", RunCmd),
                _lib: lib,
            })
        }
    }

    /// Run one command buffer in a fresh context (so it acts in the calling thread's netns);
    /// returns (ok, output, error text).
    fn run(&self, cmd: &str, json_output: bool) -> Result<(bool, String, String), NftError> {
        let c =
            CString::new(cmd).map_err(|_| NftError::Command("batch contains a NUL byte".into()))?;
        // SAFETY: ctx is checked for NULL, used only on this thread, and freed exactly once;
        // the buffers returned by libnftables stay valid until the context is freed, and are
        // copied before that.
        unsafe {
            let ctx = (self.ctx_new)(0);
            if ctx.is_null() {
                return Err(NftError::Load("nft_ctx_new returned NULL".into()));
            }
            (self.buffer_output)(ctx);
            (self.buffer_error)(ctx);
            if json_output {
                (self.set_output_flags)(ctx, OUTPUT_JSON);
            }
            let rc = (self.run_cmd)(ctx, c.as_ptr());
            let read = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let out = read((self.get_output)(ctx));
            let err = read((self.get_error)(ctx));
            (self.ctx_free)(ctx);
            Ok((rc == 0, out, err))
        }
    }
}

/// Batches longer than this (a policy table with ~100,000 set elements is ~1.5 MB) are parsed
/// by a short-lived `nft` process when the binary is there: libnftables needs over 100 MiB to
/// parse them, and in-process that heap would stay with the caller (glibc keeps what it freed).
const LARGE_BATCH: usize = 256 * 1024;

/// True when an `nft` binary is on PATH (looked up once).
fn nft_binary_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("nft").is_file()))
    })
}

impl NftExecutor for LibNftables {
    fn apply_touching_large_sets(&self, batch: &str) -> Result<(), NftError> {
        // Measured at 100,000 policy set elements: a two-element change cost the agent a
        // ~30 MiB libnftables cache of every element, its peak RSS.
        if nft_binary_present() {
            return NftBinary.apply(batch);
        }
        self.apply(batch)
    }

    fn apply(&self, batch: &str) -> Result<(), NftError> {
        if batch.len() > LARGE_BATCH && nft_binary_present() {
            return NftBinary.apply(batch);
        }
        observed(|| {
            let (ok, _, err) = self.run(batch, false)?;
            if ok {
                Ok(())
            } else {
                Err(NftError::Command(err.trim().to_string()))
            }
        })
    }

    fn list_table(&self, family: &str, table: &str) -> Result<Option<serde_json::Value>, NftError> {
        let (ok, out, err) = self.run(&format!("list table {family} {table}"), true)?;
        listing(ok, &out, &err)
    }

    fn name(&self) -> &'static str {
        "libnftables"
    }
}

/// The `nft` binary, one process per transaction.
#[derive(Debug, Default)]
pub struct NftBinary;

impl NftBinary {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<(bool, String, String), NftError> {
        let mut child = Command::new("nft")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        let o = child.wait_with_output()?;
        Ok((
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    }
}

impl NftExecutor for NftBinary {
    fn apply(&self, batch: &str) -> Result<(), NftError> {
        observed(|| {
            let (ok, _, err) = self.run(&["-f", "-"], Some(batch))?;
            if ok {
                Ok(())
            } else {
                Err(NftError::Command(err.trim().to_string()))
            }
        })
    }

    fn list_table(&self, family: &str, table: &str) -> Result<Option<serde_json::Value>, NftError> {
        let (ok, out, err) = self.run(&["-j", "list", "table", family, table], None)?;
        listing(ok, &out, &err)
    }

    fn name(&self) -> &'static str {
        "nft binary"
    }
}

/// libnftables when it loads, else the `nft` binary. `FERRYNET_NFT=binary` forces the binary.
pub fn default_executor() -> Box<dyn NftExecutor> {
    if std::env::var("FERRYNET_NFT").as_deref() != Ok("binary") {
        match LibNftables::load() {
            Ok(l) => return Box::new(l),
            Err(e) => tracing::debug!(error = %e, "falling back to the nft binary"),
        }
    }
    Box::new(NftBinary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::in_private_netns;

    #[test]
    fn libnftables_applies_atomically_and_lists() {
        in_private_netns(|| {
            let n = LibNftables::load().expect("libnftables.so.1 (Debian package libnftables1)");
            assert!(n.list_table("inet", "fnt").unwrap().is_none());
            n.apply("add table inet fnt\nadd set inet fnt s { type ipv4_addr; }\nadd element inet fnt s { 10.0.0.1 }").unwrap();
            assert!(n.list_table("inet", "fnt").unwrap().is_some());
            // A failing batch changes nothing: the first element must not appear.
            let e = n.apply("add element inet fnt s { 10.0.0.2 }\nadd element inet fnt nosuchset { 10.0.0.3 }").unwrap_err();
            assert!(
                e.to_string().contains("nosuchset") || e.to_string().contains("No such file"),
                "{e}"
            );
            let listed = n.run("list set inet fnt s", false).unwrap().1;
            assert!(
                listed.contains("10.0.0.1") && !listed.contains("10.0.0.2"),
                "{listed}"
            );
            counters_are_listed_alone(&n);
        });
    }

    /// A table's named counters are read without its sets; a missing table is None.
    fn counters_are_listed_alone(n: &dyn NftExecutor) {
        n.apply("add table inet fnc\nadd counter inet fnc dropped\nadd set inet fnc big { type ipv4_addr; }\nadd element inet fnc big { 10.9.9.9 }").unwrap();
        let v = n.list_counters("inet", "fnc").unwrap().expect("table");
        assert_eq!(v, vec![("dropped".to_string(), 0, 0)]);
        assert!(n.chain_exists("inet", "fnc", "nope").is_ok_and(|e| !e));
        assert!(n.table_exists("inet", "fnc").is_ok_and(|e| e));
        assert!(n.list_counters("inet", "nope").unwrap().is_none());
    }

    #[test]
    fn binary_executor_matches() {
        in_private_netns(|| {
            let n = NftBinary;
            n.apply("add table inet fnb").unwrap();
            assert!(n.list_table("inet", "fnb").unwrap().is_some());
            assert!(n.list_table("inet", "nope").unwrap().is_none());
            assert!(n.apply("add chain inet nope c").is_err());
            counters_are_listed_alone(&n);
        });
    }
}
