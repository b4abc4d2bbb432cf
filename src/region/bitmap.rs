//! A fixed-size bitmap, one bit per chunk, with word-at-a-time search.

/// One bit per chunk.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitmap({}/{} set)", self.ones, self.len)
    }
}

/// A bitmap from a peer did not fit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    /// The byte length is not `ceil(len / 8)`.
    #[error("bitmap of {got} bytes for {bits} bits (expected {want} bytes)")]
    Length { got: usize, want: usize, bits: u64 },
    /// Bits past the end are set.
    #[error("bits set past the end of the bitmap")]
    Padding,
}

impl Bitmap {
    /// All clear.
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    /// All set.
    pub fn full(len: u64) -> Bitmap {
        let mut b = Bitmap::new(len);
        for w in b.words.iter_mut() {
            *w = u64::MAX;
        }
        if len % 64 != 0 {
            if let Some(last) = b.words.last_mut() {
                *last = (1u64 << (len % 64)) - 1;
            }
        }
        b.ones = len;
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    /// True when every bit is set.
    pub fn all(&self) -> bool {
        self.ones == self.len
    }

    /// Bit `i` (false past the end).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear. Ignores `i` past the end.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        let was_clear = *w & m == 0;
        *w |= m;
        self.ones += was_clear as u64;
        was_clear
    }

    /// Clears bit `i`; returns whether it was set. Ignores `i` past the end.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        let was_set = *w & m != 0;
        *w &= !m;
        self.ones -= was_set as u64;
        was_set
    }

    /// The first bit equal to `value` at or after `from`, without wrapping (a word at a
    /// time).
    fn scan(&self, from: u64, value: bool) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let word = |wi: usize| {
            if value {
                self.words[wi]
            } else {
                !self.words[wi]
            }
        };
        let mut wi = (from / 64) as usize;
        let mut w = word(wi) & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + w.trailing_zeros() as u64;
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = word(wi);
        }
    }

    /// The first set bit at or after `from`, without wrapping.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.scan(from, true)
    }

    /// The first set bit at or after `from`, wrapping to the start.
    pub fn next_set_wrapping(&self, from: u64) -> Option<u64> {
        if self.ones == 0 {
            return None;
        }
        self.next_set(from.min(self.len))
            .or_else(|| self.next_set(0))
    }

    /// The first clear bit at or after `from`, without wrapping.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        self.scan(from, false)
    }

    /// The complement.
    pub fn inverted(&self) -> Bitmap {
        let mut b = Bitmap::full(self.len);
        for (o, w) in b.words.iter_mut().zip(&self.words) {
            *o &= !w;
        }
        b.ones = self.len - self.ones;
        b
    }

    /// LSB-first bytes, `ceil(len/8)` of them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.len.div_ceil(8) as usize;
        let mut out = Vec::with_capacity(n);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// Parses bytes from a peer: the length must be exact and padding bits clear.
    pub fn from_bytes(bytes: &[u8], len: u64) -> Result<Bitmap, BitmapError> {
        let want = len.div_ceil(8) as usize;
        if bytes.len() != want {
            return Err(BitmapError::Length {
                got: bytes.len(),
                want,
                bits: len,
            });
        }
        let mut b = Bitmap::new(len);
        for (wi, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            b.words[wi] = u64::from_le_bytes(w);
        }
        if len % 64 != 0 {
            if let Some(last) = b.words.last() {
                if last >> (len % 64) != 0 {
                    return Err(BitmapError::Padding);
                }
            }
        }
        b.ones = b.words.iter().map(|w| w.count_ones() as u64).sum();
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count() {
        let mut b = Bitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert_eq!(b.count_ones(), 2);
        assert!(b.clear(0));
        assert!(!b.clear(0));
        assert_eq!(b.count_ones(), 1);
        assert!(b.get(129) && !b.get(128) && !b.get(1000));
    }

    #[test]
    fn search() {
        let mut b = Bitmap::new(200);
        assert_eq!(b.next_set(0), None);
        assert_eq!(b.next_set_wrapping(50), None);
        b.set(70);
        b.set(150);
        assert_eq!(b.next_set(0), Some(70));
        assert_eq!(b.next_set(71), Some(150));
        assert_eq!(b.next_set(151), None);
        assert_eq!(b.next_set_wrapping(151), Some(70));
        assert_eq!(b.next_set_wrapping(500), Some(70));
        assert_eq!(b.next_clear(70), Some(71));
        let f = Bitmap::full(200);
        assert_eq!(f.next_clear(0), None);
        assert_eq!(f.count_ones(), 200);
        assert_eq!(b.inverted().count_ones(), 198);
        assert!(!b.inverted().get(70));
    }

    #[test]
    fn bytes_round_trip_and_validation() {
        for len in [0u64, 1, 7, 8, 9, 63, 64, 65, 1000] {
            let mut b = Bitmap::new(len);
            for i in (0..len).step_by(3) {
                b.set(i);
            }
            let bytes = b.to_bytes();
            assert_eq!(bytes.len() as u64, len.div_ceil(8));
            assert_eq!(Bitmap::from_bytes(&bytes, len).unwrap(), b);
            assert_eq!(Bitmap::full(len).to_bytes().len() as u64, len.div_ceil(8));
            assert_eq!(
                Bitmap::from_bytes(&Bitmap::full(len).to_bytes(), len).unwrap(),
                Bitmap::full(len)
            );
        }
        assert!(matches!(
            Bitmap::from_bytes(&[0; 3], 9),
            Err(BitmapError::Length { .. })
        ));
        assert_eq!(Bitmap::from_bytes(&[0, 0b10], 9), Err(BitmapError::Padding));
    }
}
