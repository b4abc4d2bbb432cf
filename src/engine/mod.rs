//! Transfer state machines. They take events and return what to send; they own no
//! sockets, files or clocks, so every case is a fast deterministic unit test.

pub mod clock;
pub mod migrate;
pub mod pull;
pub mod replicate;
