//! pagewire: replicate and live-migrate Linux memory regions between hosts over QUIC.
//!
//! The crate is laid out after `shared/DESIGN.md`:
//!
//! * [`proto`] — wire messages and the frame codec; pure data, no I/O policy.
//! * [`engine`] — transfer state machines that take events and return actions; no sockets,
//!   no clock, so convergence and failure cases are unit-tested deterministically.
//! * [`region`] — regions (name, size, backing), chunk geometry and bitmaps.
//! * [`transport`] — QUIC endpoint, mutual TLS, identities, error codes.
//! * [`certs`] — a development CA and node certificates (rcgen).
//! * [`agent`] — the daemon: peers, serving, pulls, the control socket, status.
//! * [`control`] — the control-socket protocol and its client (what the CLI uses).
//! * [`fault`] — demand paging: userfaultfd ioctls, the mprotect/SIGSEGV fallback, fd
//!   passing.
//! * [`client`] — what an application links: attach a region lazily.
//! * [`wan`] — a user-space UDP relay that emulates WAN delay, jitter, loss and rate.

pub mod agent;
pub mod certs;
pub mod client;
pub mod control;
pub mod demo;
pub mod engine;
pub mod fault;
pub mod progress;
pub mod proto;
pub mod region;
pub mod track;
pub mod transport;
pub mod wan;

/// The software version, reported in hellos and `status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
