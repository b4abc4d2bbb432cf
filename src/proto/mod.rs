//! The peer-to-peer protocol: messages exchanged between agents on one QUIC connection.
//!
//! # Connection
//!
//! One QUIC connection per pair of agents, mutual TLS, ALPN [`ALPN`] (`pagewire/2`): the
//! protocol version travels in the ALPN string, so a peer of another major version fails
//! the TLS handshake with `no_application_protocol`. The dialer then opens the first
//! bidirectional stream and sends [`Request::Hello`]; the acceptor checks the version and
//! that the hello's name is the name in the peer's certificate, and answers
//! [`Reply::Hello`]. Only then is the connection used for anything else.
//!
//! ```text
//!  dialer (A)                                 acceptor (B)
//!     |--- QUIC + TLS 1.3, ALPN pagewire/2 ------>|  client certs checked both ways
//!     |--- bi stream 0: Request::Hello ---------->|  version + name == cert name
//!     |<-- Reply::Hello --------------------------|
//!     |                                           |
//!     |--- bi stream: Request::RegionInfo ------->|
//!     |<-- Reply::RegionInfo | Reply::Error ------|
//!     |--- bi stream: Request::Bulk(want, credit)>|  background copy of one region
//!     |<-- Chunk hdr + bytes | Zero run ... ------|  data frames spend credit
//!     |--- BulkControl::Credit / Seek / Have ---->|  (same stream, other direction)
//!     |<-- Reply::Done ---------------------------|  every wanted chunk sent
//!     |--- bi stream (high priority): Fetch ----->|  urgent, one chunk
//!     |<-- Chunk hdr + bytes | Zero | Error ------|
//!     |--- bi stream: Request::Migrate ---------->|  live migration of one region
//!     |<-- Reply::Migrating | Reply::Error -------|
//!     |--- MigrateFrame: Begin, Chunk+bytes, ---->|  in order, one stream
//!     |    Zero, Stale, Handover, Query           |
//!     |<-- MigrateBack: Ack, Accept, Status, -----|
//!     |    Fetch, Error                           |
//! ```
//!
//! Every request opens its own stream: a region's bulk copy never blocks another region's
//! requests, and streams cost no handshake. Either side may send requests; both serve.
//!
//! # Urgent over bulk
//!
//! quinn's stream priorities order only data already queued inside quinn, and the
//! connection's send buffer is shared. The bulk sender therefore only writes data the
//! receiver has granted *credit* for ([`BulkControl::Credit`]), so at most `window`
//! bytes of bulk data are ever queued in quinn, and urgent replies are written at a higher
//! priority: an urgent reply waits for at most one window of bulk data, never for the
//! region. Zero chunks cost no credit (they are markers, not data).
//!
//! # Frames
//!
//! `u32` little-endian length, then a `bincode` 2 payload ([`codec`]). Chunk data follows
//! its [`ChunkHeader`] as `len` raw bytes, so large payloads are not copied through the
//! decoder. Every length is checked against a cap before anything is allocated.
//!
//! # Versioning
//!
//! Enums only ever grow at the end; a new incompatible version changes the ALPN
//! (`pagewire/2`) and [`PROTOCOL_VERSION`].

pub mod codec;

use bincode::{Decode, Encode};

/// The protocol version carried in [`Hello`]; must equal the ALPN's.
/// 2: a migration's `Accept` carries B's resume instant, and `Ping`/`Pong` sample B's
/// clock.
pub const PROTOCOL_VERSION: u32 = 2;
/// The ALPN string: the version is part of it.
pub const ALPN: &[u8] = b"pagewire/2";

/// Largest chunk a peer may announce or send (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Smallest chunk size (one page).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Most chunks a region may have (2^24: 64 GiB at 4 KiB chunks, 1 TiB at 64 KiB).
pub const MAX_CHUNKS: u64 = 1 << 24;
/// Longest region or peer name.
pub const MAX_NAME_LEN: usize = 255;
/// Largest encoded control frame (a want-bitmap of [`MAX_CHUNKS`] bits plus headers).
pub const MAX_FRAME: usize = (MAX_CHUNKS as usize / 8) + 4096;
/// Largest error message kept from a peer.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Exchanged first on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The sender's node name; must equal the name in its certificate.
    pub name: String,
    /// The sender's software version, for logs.
    pub software: String,
    /// Random per agent process: a new value on an existing peer's connection means it
    /// restarted, so the old connection is dead even if it has not timed out yet.
    pub boot: u64,
}

/// The first frame on a bidirectional stream opened by a peer.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    /// Connection opening (first stream only).
    Hello(Hello),
    /// Size and chunk size of a region.
    RegionInfo { region: String },
    /// One chunk, now (urgent lane).
    Fetch { region: String, chunk: u64 },
    /// Background copy of the chunks in `want`.
    Bulk(BulkStart),
    /// Continuous replication of one region from its owner (the sender) into the
    /// replica's region of the same name. The replica answers [`Reply::ReplicaState`];
    /// then the owner sends [`Push`] frames (epochs) and the replica answers each epoch
    /// with [`ReplicaAck`] on its side of the stream.
    Replicate(ReplicateStart),
    /// A live migration of one region from the sender (its owner) to the receiver, which
    /// serves a region of the same name, size and chunk size. The receiver answers
    /// [`Reply::Migrating`] (or an error); then the sender sends [`MigrateFrame`]s and the
    /// receiver answers with [`MigrateBack`] frames, both on this one stream, in order
    /// (see `engine::migrate` for the protocol).
    Migrate(MigrateOpen),
    /// The urgent lane of a migration in post-copy: the sender (the source) opens it at
    /// high priority and sends only `MigrateFrame::Chunk`/`Zero` frames of chunks the
    /// receiver's application faulted on, so they do not queue behind background chunks
    /// on the migration stream. The receiver never answers on it.
    MigrateUrgent { region: String, generation: u64 },
    /// The sender owns `region`: it was migrated to the sender from the receiver, whose
    /// agent may have restarted since and forgotten the handover. Sent when a connection
    /// is set up; the receiver answers [`Reply::Done`] (or an error).
    Owns { region: String },
    /// The sender, `region`'s owner, ended its replication to the receiver while the two
    /// were not connected (see [`Push::Stop`], which it could not send). Sent when a
    /// connection is set up; the receiver answers [`Reply::Done`]. `reason` is at most
    /// [`MAX_STOP_REASON`] bytes.
    ReplicationEnded { region: String, reason: String },
}

/// Opens a migration stream (a new migration, or a query after a reconnect).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MigrateOpen {
    pub region: String,
    /// The sender's region size and chunk size; the receiver's must match.
    pub size: u64,
    pub chunk_size: u32,
    /// Chunks may be left stale at the handover and fetched on demand: the receiver
    /// refuses unless an application receives the region there (`client::receive`).
    pub postcopy: bool,
}

/// Sender (host A) to receiver (host B) on a migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum MigrateFrame {
    /// A migration of generation `generation` begins.
    Begin {
        generation: u64,
        size: u64,
        chunk_size: u32,
    },
    /// One chunk: followed by exactly `len` raw bytes (`len` is the chunk's length).
    Chunk(ChunkHeader),
    /// One chunk of zero bytes.
    Zero { chunk: u64 },
    /// Ownership passes to the receiver once it has received `sent` chunks on this
    /// stream. `stale`: bitmap (LSB first, `ceil(chunks/8)` bytes) of the chunks it must
    /// fetch before use.
    Handover {
        generation: u64,
        stale: Vec<u8>,
        sent: u64,
    },
    /// After a reconnect: does the receiver own `generation`?
    Query { generation: u64 },
    /// Pre-copy: the receiver's copies of these chunks (bitmap, as in `Handover`) are
    /// out of date and will not be re-sent before the handover unless they cool off;
    /// the receiver may drop them now. In order with the chunk frames.
    Stale { chunks: Vec<u8> },
    /// A clock sample: the sender's clock in µs (any origin) when sent. The receiver
    /// answers [`MigrateBack::Pong`].
    Ping { at_us: u64 },
}

/// Receiver (host B) to sender (host A) on a migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum MigrateBack {
    /// These chunks arrived and were written.
    Ack { chunks: Vec<u64> },
    /// The receiver owns `generation` now; `held_us`: from reading the `Handover` to its
    /// application running, in µs; `resumed_us`: when its application was let run, on
    /// the receiver's clock (the one its `Pong`s use), in µs.
    Accept {
        generation: u64,
        held_us: u64,
        resumed_us: u64,
    },
    /// Answer to `Query`: the bitmap of chunks still missing if the receiver owns
    /// `generation`, `None` if it does not (and never will: the generation is fenced).
    Status {
        generation: u64,
        missing: Option<Vec<u8>>,
    },
    /// The receiver's application waits for these chunks (post-copy).
    Fetch { chunks: Vec<u64> },
    /// The receiver refused a frame; the stream ends after this.
    Error(ErrorReply),
    /// The receiver dropped the copies named by the `Stale` frame before this one
    /// (one answer per `Stale`).
    Dropped,
    /// The answer to a `Ping`: its `at_us`, and the receiver's clock in µs when it read
    /// it (how the sender places the receiver's instants on its own clock).
    Pong { at_us: u64, peer_us: u64 },
}

/// Opens a replication stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ReplicateStart {
    pub region: String,
    /// The owner's region size and chunk size; the replica's copy must match.
    pub size: u64,
    pub chunk_size: u32,
}

/// The replica's state, so the owner sends only what differs (catch-up by hash).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ReplicaState {
    /// The last epoch the replica applied from this owner (0: none since it started).
    pub epoch: u64,
    /// xxh3-64 of every chunk of the replica's copy (all-zero chunks hash as zeros).
    pub hashes: Vec<u64>,
}

/// Owner to replica, after [`ReplicaState`]: epochs, each `Begin`, pieces, `End`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Push {
    /// Epoch `epoch` starts. `catch_up`: computed by hash comparison, not tracking.
    Begin { epoch: u64, catch_up: bool },
    /// `len` bytes at `offset`, blake3 `hash` of those bytes. Followed by `len` raw bytes,
    /// or by `compressed` lz4 bytes when `compressed` is not zero. Never crosses a chunk
    /// boundary.
    Data {
        offset: u64,
        len: u32,
        compressed: u32,
        hash: [u8; 32],
    },
    /// `len` zero bytes at `offset`.
    Zero { offset: u64, len: u64 },
    /// Epoch `epoch` is complete: apply it, then acknowledge.
    End { epoch: u64 },
    /// Between epochs: the owner stops replicating the region to this replica (an
    /// operator stopped it, or the region was migrated to another agent), and why (at
    /// most [`MAX_STOP_REASON`] bytes). The replica keeps what it applied.
    Stop { reason: String },
}

/// Longest reason a [`Push::Stop`] carries.
pub const MAX_STOP_REASON: usize = 1024;

/// Replica to owner: an epoch was applied in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ReplicaAck {
    pub epoch: u64,
}

/// Opens a bulk copy: which chunks the receiver still needs, where to start, and how many
/// data bytes the sender may have in flight before more credit arrives.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct BulkStart {
    pub region: String,
    /// The chunk size the receiver expects (from [`RegionInfo`]); must match.
    pub chunk_size: u32,
    /// The region size the receiver expects; must match.
    pub size: u64,
    /// Bitmap, one bit per chunk (LSB first), set = wanted. Exactly `ceil(chunks/8)` bytes.
    pub want: Vec<u8>,
    /// Chunk to start from (locality hint); the sender wraps around.
    pub start: u64,
    /// Initial credit in data bytes.
    pub credit: u64,
}

/// Frames the receiver sends on a bulk stream after [`BulkStart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum BulkControl {
    /// Grant this many more data bytes.
    Credit(u64),
    /// Continue from this chunk (locality hint after an urgent fetch).
    Seek(u64),
    /// The receiver already has this chunk (it came by the urgent lane): skip it.
    Have(u64),
}

/// Replies, on the stream a request came on.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Reply {
    Hello(Hello),
    RegionInfo(RegionInfo),
    /// Followed by exactly `len` raw bytes on the stream.
    Chunk(ChunkHeader),
    /// Chunks `first .. first+count` are all zero bytes.
    Zero {
        first: u64,
        count: u64,
    },
    /// Bulk copy finished: every wanted chunk has been sent.
    Done,
    /// The request failed; the stream is finished after this.
    Error(ErrorReply),
    /// Answer to [`Request::Replicate`].
    ReplicaState(ReplicaState),
    /// Answer to [`Request::Migrate`]: the receiver takes the stream.
    Migrating,
}

/// What a peer knows about one of its regions.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RegionInfo {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
}

/// Precedes a chunk's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ChunkHeader {
    pub chunk: u64,
    pub len: u32,
    /// blake3 of the bytes that follow.
    pub hash: [u8; 32],
}

/// An error answered to a request.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum ErrorKind {
    /// No region of that name on this agent.
    UnknownRegion,
    /// Chunk index past the end of the region.
    OutOfRange,
    /// The request does not match the region (size or chunk size changed, bad bitmap).
    Mismatch,
    /// Reading the region failed on the serving side.
    Io,
    /// The request was not understood.
    BadRequest,
    /// The region is busy (a migration of it is already running) or not in a state to
    /// take the request.
    Busy,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorKind::UnknownRegion => "unknown region",
            ErrorKind::OutOfRange => "chunk out of range",
            ErrorKind::Mismatch => "region mismatch",
            ErrorKind::Io => "I/O error on the serving agent",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::Busy => "region busy",
        };
        f.write_str(s)
    }
}

/// Application error codes used to close streams and connections. Named so that logs on
/// both ends say the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WireCode {
    /// Normal close.
    NoError = 0,
    /// A frame could not be decoded, or violated the protocol's rules.
    ProtocolViolation = 1,
    /// A frame's length prefix is above the cap for that stream.
    FrameTooLarge = 2,
    /// The peer speaks another protocol version.
    VersionMismatch = 3,
    /// The peer's certificate name is not one of our expected peers.
    UnknownPeer = 4,
    /// A frame arrived that is valid but not allowed at this point.
    UnexpectedFrame = 5,
    /// The agent is shutting down.
    Shutdown = 6,
    /// A second connection to the same peer replaced this one.
    Duplicate = 7,
    /// The receiver dropped the transfer (cancelled).
    Cancelled = 8,
    /// The peer did not say hello in time.
    Timeout = 9,
}

impl WireCode {
    /// The upper-case name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            WireCode::NoError => "NO_ERROR",
            WireCode::ProtocolViolation => "PROTOCOL_VIOLATION",
            WireCode::FrameTooLarge => "FRAME_TOO_LARGE",
            WireCode::VersionMismatch => "VERSION_MISMATCH",
            WireCode::UnknownPeer => "UNKNOWN_PEER",
            WireCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            WireCode::Shutdown => "SHUTDOWN",
            WireCode::Duplicate => "DUPLICATE_CONNECTION",
            WireCode::Cancelled => "CANCELLED",
            WireCode::Timeout => "TIMEOUT",
        }
    }

    /// Decode a code received from a peer (unknown values stay unknown).
    pub fn from_u64(v: u64) -> Option<WireCode> {
        use WireCode::*;
        [
            NoError,
            ProtocolViolation,
            FrameTooLarge,
            VersionMismatch,
            UnknownPeer,
            UnexpectedFrame,
            Shutdown,
            Duplicate,
            Cancelled,
            Timeout,
        ]
        .into_iter()
        .find(|c| *c as u64 == v)
    }

    /// As a quinn error code.
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }
}

impl std::fmt::Display for WireCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks a node or region name: 1..=255 bytes of `[A-Za-z0-9._-]`, not starting with `.`
/// or `-`. Node names become DNS names in certificates, so they are also checked there.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_round_trip() {
        for v in 0..20u64 {
            if let Some(c) = WireCode::from_u64(v) {
                assert_eq!(c as u64, v);
                assert!(!c.name().is_empty());
            }
        }
        assert_eq!(WireCode::from_u64(1), Some(WireCode::ProtocolViolation));
        assert_eq!(WireCode::from_u64(999), None);
    }

    #[test]
    fn names() {
        assert!(valid_name("a"));
        assert!(valid_name("node-1.dc2"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(256)));
    }
}
