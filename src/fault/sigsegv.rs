//! The mprotect fallback, application side: a SIGSEGV handler for mappings that start
//! `PROT_NONE`.
//!
//! The handler does only async-signal-safe work: atomic loads and one compare-exchange
//! on the chunk's state word (a [`ChunkTable`](super::ChunkTable) shared with the
//! agent), `send(2)` of the chunk number on a seqpacket socket to the agent, `futex(2)`
//! waits, `mprotect(2)`, and `tgkill(2)`. It never allocates or locks. A fault outside
//! every registered mapping goes to the handler that was installed before ours (Rust's
//! stack-overflow handler, or the default action).
//!
//! Protection granule: one chunk. When a chunk becomes accessible the handler also opens
//! the present chunks next to it in the same `mprotect`, so neighbouring VMAs merge and a
//! region filled in order stays a handful of VMAs (page-granular mprotect on a large
//! region can exceed `vm.max_map_count`, see DESIGN.md).

use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Duration;

use super::state;

/// Registered mappings at once, per process.
pub const MAX_SLOTS: usize = 64;
/// Longest run of present neighbours opened along with a chunk (bounds handler time).
const NEIGHBOURS: usize = 4096;

struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    table: AtomicPtr<u32>,
    chunks: AtomicUsize,
    shift: AtomicU32,
    sock: AtomicI32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    table: AtomicPtr::new(std::ptr::null_mut()),
    chunks: AtomicUsize::new(0),
    shift: AtomicU32::new(0),
    sock: AtomicI32::new(-1),
};

static SLOTS: [Slot; MAX_SLOTS] = [EMPTY; MAX_SLOTS];
static REGISTER: Mutex<()> = Mutex::new(());
static CHAIN: SegvHandler = SegvHandler::new();

/// The signature of an `SA_SIGINFO` handler.
pub(crate) type SigInfoHandler =
    extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// One of our SIGSEGV handlers, installed once per process, and the action it was
/// installed over (to which it passes faults that are not its own). Shared by this
/// demand-paging handler and the mprotect dirty tracker's; each chains to whichever was
/// there before it.
pub(crate) struct SegvHandler {
    once: Once,
    previous: OnceLock<libc::sigaction>,
}

impl SegvHandler {
    pub(crate) const fn new() -> SegvHandler {
        SegvHandler {
            once: Once::new(),
            previous: OnceLock::new(),
        }
    }

    /// Installs `handler` for SIGSEGV the first time it is called.
    pub(crate) fn install(&self, handler: SigInfoHandler) -> std::io::Result<()> {
        let mut err = None;
        self.once.call_once(|| {
            // SAFETY: a zeroed sigaction is valid; we fill handler, flags and mask, then
            // install it, keeping the previous action for chaining.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = handler as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGSEGV, &sa, &mut old) != 0 {
                    err = Some(std::io::Error::last_os_error());
                    return;
                }
                let _ = self.previous.set(old);
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// Passes a fault that is not ours to the previous action (async-signal-safe: an
    /// atomic load and a call, or restoring the default action so the access faults
    /// again and the process dies as it would have without us).
    pub(crate) fn chain(
        &self,
        sig: libc::c_int,
        info: *mut libc::siginfo_t,
        ctx: *mut libc::c_void,
    ) {
        // SAFETY: calling the previous handler with our arguments is what the kernel
        // would have done; sigaction is async-signal-safe.
        unsafe {
            match self.previous.get() {
                Some(old)
                    if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN =>
                {
                    if old.sa_flags & libc::SA_SIGINFO != 0 {
                        let f: SigInfoHandler = std::mem::transmute(old.sa_sigaction);
                        f(sig, info, ctx);
                    } else {
                        let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
                        f(sig);
                    }
                }
                _ => {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &sa, std::ptr::null_mut());
                }
            }
        }
    }
}

/// Registering a mapping with the handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// All slots are in use.
    #[error("more than {MAX_SLOTS} mprotect-mode mappings in one process")]
    Full,
    /// sigaction failed.
    #[error("installing the SIGSEGV handler: {0}")]
    Sigaction(std::io::Error),
}

/// A mapping known to the handler; unregistered on drop.
pub struct Registration {
    slot: usize,
}

/// Registers `[base, base+len)` (which must already be `PROT_NONE`), cut in chunks of
/// `1 << shift` bytes whose states live at `table` and whose requests go to `sock`.
/// The caller keeps all three alive until the registration is dropped.
pub fn register(
    base: usize,
    len: usize,
    shift: u32,
    table: *mut u32,
    chunks: usize,
    sock: i32,
) -> Result<Registration, HandlerError> {
    install()?;
    let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
    let slot = SLOTS
        .iter()
        .position(|s| s.len.load(Ordering::Acquire) == 0)
        .ok_or(HandlerError::Full)?;
    let s = &SLOTS[slot];
    s.base.store(base, Ordering::Release);
    s.table.store(table, Ordering::Release);
    s.chunks.store(chunks, Ordering::Release);
    s.shift.store(shift, Ordering::Release);
    s.sock.store(sock, Ordering::Release);
    // `len` last: a non-zero len publishes the slot.
    s.len.store(len, Ordering::Release);
    Ok(Registration { slot })
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        let s = &SLOTS[self.slot];
        s.len.store(0, Ordering::Release);
        s.sock.store(-1, Ordering::Release);
    }
}

fn install() -> Result<(), HandlerError> {
    CHAIN.install(handler).map_err(HandlerError::Sigaction)
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; we restore what the interrupted code saw.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut handled = false;
    for s in SLOTS.iter() {
        let len = s.len.load(Ordering::Acquire);
        let base = s.base.load(Ordering::Acquire);
        if len != 0 && addr >= base && addr < base + len {
            handle(s, base, len, addr);
            handled = true;
            break;
        }
    }
    if !handled {
        CHAIN.chain(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn handle(s: &Slot, base: usize, len: usize, addr: usize) {
    let shift = s.shift.load(Ordering::Acquire);
    let chunks = s.chunks.load(Ordering::Acquire);
    let table = s.table.load(Ordering::Acquire);
    let chunk = (addr - base) >> shift;
    if chunk >= chunks || table.is_null() {
        return sigbus();
    }
    // SAFETY: the table maps `chunks` u32 words and outlives the registration.
    let word = |i: usize| unsafe { &*(table.add(i) as *const AtomicU32) };
    let w = word(chunk);
    loop {
        match w.load(Ordering::Acquire) {
            state::PRESENT => break,
            state::FAILED => return sigbus(),
            state::MISSING => {
                if w.compare_exchange(
                    state::MISSING,
                    state::REQUESTED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
                {
                    let sock = s.sock.load(Ordering::Acquire);
                    let msg = (chunk as u64).to_le_bytes();
                    // SAFETY: send(2) is async-signal-safe; the buffer is on our stack.
                    let n = unsafe {
                        libc::send(sock, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL)
                    };
                    if n != msg.len() as isize {
                        // The agent is gone: nobody will ever fill this chunk.
                        w.store(state::FAILED, Ordering::Release);
                        return sigbus();
                    }
                }
            }
            cur => super::futex_wait(w, cur, Duration::from_millis(500)),
        }
    }
    // Open this chunk and the present chunks around it in one call.
    let mut lo = chunk;
    while lo > 0
        && chunk - lo < NEIGHBOURS
        && word(lo - 1).load(Ordering::Acquire) == state::PRESENT
    {
        lo -= 1;
    }
    let mut hi = chunk + 1;
    while hi < chunks
        && hi - chunk < NEIGHBOURS
        && word(hi).load(Ordering::Acquire) == state::PRESENT
    {
        hi += 1;
    }
    let start = base + (lo << shift);
    let end = (base + (hi << shift)).min(base + len.next_multiple_of(4096));
    // SAFETY: mprotect(2) is async-signal-safe; the range is inside our registered
    // mapping (page-aligned: chunks are page multiples and the mapping is page-rounded).
    let r = unsafe {
        libc::mprotect(
            start as *mut libc::c_void,
            end - start,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if r != 0 {
        // ENOMEM past vm.max_map_count: open just the chunk (splits less) and retry.
        let cs = base + (chunk << shift);
        let ce = (cs + (1 << shift)).min(end);
        // SAFETY: as above, a sub-range of the same mapping.
        let r2 = unsafe {
            libc::mprotect(
                cs as *mut libc::c_void,
                ce - cs,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if r2 != 0 {
            sigbus();
        }
    }
}

/// Delivers SIGBUS to this thread: the chunk cannot be had (the application sees what it
/// would see on a file mapping whose disk failed).
fn sigbus() {
    // SAFETY: getpid/gettid/tgkill are async-signal-safe system calls.
    unsafe {
        let pid = libc::getpid();
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGBUS);
    }
}
