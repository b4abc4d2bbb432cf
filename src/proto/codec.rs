//! Frame codec: `u32` LE length + one `bincode` 2 value, with a cap checked before any
//! allocation. The only place that knows the encoding, so it can be swapped.

use bincode::{Decode, Encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{WireCode, MAX_FRAME};

/// The one bincode configuration used on the wire (varint integers, little endian), with
/// a decode limit so that a length *inside* a frame cannot make us allocate more than the
/// frame could hold.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME }>()
}

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream or connection failed.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The length prefix is above the cap for this stream.
    #[error("frame of {len} bytes is over the {cap} byte limit")]
    TooLarge { len: u64, cap: usize },
    /// The payload does not decode to the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The code to close the stream with.
    pub fn code(&self) -> WireCode {
        match self {
            FrameError::TooLarge { .. } => WireCode::FrameTooLarge,
            FrameError::Io(_) => WireCode::Cancelled,
            FrameError::Truncated | FrameError::Malformed(_) => WireCode::ProtocolViolation,
        }
    }

    /// True when the peer sent bad data (as opposed to the transport failing).
    pub fn is_protocol(&self) -> bool {
        !matches!(self, FrameError::Io(_))
    }
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Encode>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    // Encoding into a Vec cannot fail for our types (no limit is hit when encoding values
    // we built ourselves; the limit only guards decoding).
    match bincode::encode_into_std_write(msg, &mut out, bincode::config::standard()) {
        Ok(_) => {}
        Err(e) => unreachable!("encoding into a Vec failed: {e}"),
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// Decodes exactly one value from `buf` (the payload, without the length prefix).
/// Trailing bytes are an error.
pub fn decode<T: Decode<()>>(buf: &[u8]) -> Result<T, FrameError> {
    let (v, used) = bincode::decode_from_slice(buf, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != buf.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after message",
            buf.len() - used
        )));
    }
    Ok(v)
}

/// Writes one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Encode,
{
    w.write_all(&encode(msg)).await
}

/// Reads one frame of at most `cap` payload bytes. `Ok(None)` when the stream ended
/// cleanly before a new frame started.
pub async fn read_frame<R, T>(r: &mut R, cap: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: Decode<()>,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > cap {
        return Err(FrameError::TooLarge {
            len: len as u64,
            cap,
        });
    }
    let mut buf = vec![0u8; len];
    read_exact(r, &mut buf).await?;
    decode(&buf).map(Some)
}

/// Reads exactly `buf.len()` bytes; a clean end of stream before that is [`FrameError::Truncated`].
pub async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Reads frames through an internal buffer, so that [`next`](FrameReader::next) is
/// cancel-safe: a frame half-read when the future is dropped stays in the buffer. Lets one
/// task `select!` between reading a peer's frames and doing other work.
pub struct FrameReader<R> {
    inner: R,
    buf: bytes::BytesMut,
    cap: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames of at most `cap` payload bytes.
    pub fn new(inner: R, cap: usize) -> Self {
        FrameReader {
            inner,
            buf: bytes::BytesMut::with_capacity(cap.min(64 << 10) + 4),
            cap,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub async fn next<T: Decode<()>>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > self.cap {
                    return Err(FrameError::TooLarge {
                        len: len as u64,
                        cap: self.cap,
                    });
                }
                if self.buf.len() >= 4 + len {
                    let frame = self.buf.split_to(4 + len);
                    return decode(&frame[4..]).map(Some);
                }
                self.buf.reserve(4 + len - self.buf.len());
            } else {
                self.buf.reserve(64);
            }
            // The only await point: AsyncRead moves no data unless it completes.
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    async fn round_trip<T: Encode + Decode<()> + PartialEq + std::fmt::Debug>(msg: T) {
        let bytes = encode(&msg);
        let mut r = &bytes[..];
        let back: T = read_frame(&mut r, MAX_FRAME).await.unwrap().unwrap();
        assert_eq!(back, msg);
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn messages_round_trip() {
        round_trip(Request::Hello(Hello {
            version: 1,
            name: "a".into(),
            software: "x".into(),
            boot: 7,
        }))
        .await;
        round_trip(Request::Fetch {
            region: "r".into(),
            chunk: u64::MAX,
        })
        .await;
        round_trip(Reply::Chunk(ChunkHeader {
            chunk: 7,
            len: 65536,
            hash: [9; 32],
        }))
        .await;
        round_trip(BulkControl::Seek(12)).await;
        round_trip(Reply::Error(ErrorReply {
            kind: ErrorKind::OutOfRange,
            message: "no".into(),
        }))
        .await;
    }

    #[tokio::test]
    async fn empty_stream_is_none_and_partial_prefix_is_truncated() {
        let mut r: &[u8] = &[];
        assert!(read_frame::<_, Request>(&mut r, 100)
            .await
            .unwrap()
            .is_none());
        let mut r: &[u8] = &[1, 0];
        assert!(matches!(
            read_frame::<_, Request>(&mut r, 100).await,
            Err(FrameError::Truncated)
        ));
        let mut r: &[u8] = &[10, 0, 0, 0, 1, 2];
        assert!(matches!(
            read_frame::<_, Request>(&mut r, 100).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn oversized_prefix_is_refused_before_allocating() {
        // A 4 GiB length prefix: refused from the prefix alone.
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0, 0];
        let e = read_frame::<_, Request>(&mut r, 1 << 20).await.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }));
        assert_eq!(e.code(), WireCode::FrameTooLarge);
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let mut frame = vec![8, 0, 0, 0];
        frame.extend_from_slice(&[0xee; 8]);
        let mut r = &frame[..];
        let e = read_frame::<_, Request>(&mut r, 100).await.unwrap_err();
        assert!(matches!(e, FrameError::Malformed(_)), "{e:?}");
        assert_eq!(e.code(), WireCode::ProtocolViolation);
    }

    #[tokio::test]
    async fn inner_length_cannot_exceed_limit() {
        // A String whose varint length claims 2^60 bytes inside a small frame.
        let mut payload = vec![1u8]; // Request::RegionInfo variant index
        payload.push(255); // varint marker for u64
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        let mut r = &frame[..];
        let e = read_frame::<_, Request>(&mut r, 100).await.unwrap_err();
        assert!(matches!(e, FrameError::Malformed(_)), "{e:?}");
    }

    #[tokio::test]
    async fn trailing_bytes_are_malformed() {
        let mut bytes = encode(&BulkControl::Credit(5));
        bytes.push(0);
        let n = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame::<_, BulkControl>(&mut r, 100).await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn frame_reader_is_cancel_safe_and_checks_caps() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = FrameReader::new(rx, 100);
        let f = encode(&BulkControl::Credit(300));
        // Half a frame, then the read is cancelled: nothing is lost.
        tx.write_all(&f[..3]).await.unwrap();
        let t = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            r.next::<BulkControl>(),
        )
        .await;
        assert!(t.is_err());
        tx.write_all(&f[3..]).await.unwrap();
        tx.write_all(&encode(&BulkControl::Seek(4))).await.unwrap();
        assert_eq!(
            r.next::<BulkControl>().await.unwrap(),
            Some(BulkControl::Credit(300))
        );
        assert_eq!(
            r.next::<BulkControl>().await.unwrap(),
            Some(BulkControl::Seek(4))
        );
        tx.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(
            r.next::<BulkControl>().await,
            Err(FrameError::TooLarge { .. })
        ));
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = FrameReader::new(rx, 100);
        tx.write_all(&[5, 0, 0]).await.unwrap();
        drop(tx);
        assert!(matches!(
            r.next::<BulkControl>().await,
            Err(FrameError::Truncated)
        ));
    }
}
