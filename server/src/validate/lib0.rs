//! Write path edge, lowest layer: a bounds-checked reader over lib0 encoding, and the ids and
//! clocks every scan reads with yrs's limits applied.

use super::{MAX_CLIENT, MAX_CLOCK, Rejected, Scan};

/// A bounds-checked reader over lib0 encoding. Never allocates, never panics.
#[derive(Clone)]
pub struct Lib0Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Lib0Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Lib0Reader { buf, pos: 0 }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub fn u8(&mut self) -> Scan<u8> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(Rejected::Malformed("unexpected end"))?;
        self.pos += 1;
        Ok(b)
    }

    pub fn skip(&mut self, n: usize) -> Scan<()> {
        if n > self.remaining() {
            return Err(Rejected::Malformed("length past the end"));
        }
        self.pos += n;
        Ok(())
    }

    /// Unsigned LEB128 as lib0 writes it; at most 64 bits.
    pub fn var_u64(&mut self) -> Scan<u64> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.u8()?;
            if shift >= 64 || (shift == 63 && b & 0x7e != 0) {
                return Err(Rejected::Malformed("varint too long"));
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// lib0's signed varint (sign in bit 6 of the first byte); only its length matters here.
    pub(super) fn skip_var_i64(&mut self) -> Scan<()> {
        for _ in 0..10 {
            if self.u8()? & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(Rejected::Malformed("varint too long"))
    }

    /// A count of things each taking at least `min_bytes`: rejected if the rest of the input
    /// cannot hold that many, so no decoder downstream reserves memory for a lie.
    pub fn count(&mut self, min_bytes: usize) -> Scan<usize> {
        let n = self.var_u64()?;
        let fits = (self.remaining() / min_bytes.max(1)) as u64;
        if n > fits {
            return Err(Rejected::Malformed("count larger than the input can hold"));
        }
        Ok(n as usize)
    }

    /// `varUint8Array`: a length, then that many bytes.
    pub fn buf(&mut self) -> Scan<&'a [u8]> {
        let n = self.var_u64()?;
        if n > self.remaining() as u64 {
            return Err(Rejected::Malformed("length past the end"));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    pub fn string(&mut self) -> Scan<&'a str> {
        std::str::from_utf8(self.buf()?).map_err(|_| Rejected::Malformed("invalid UTF-8"))
    }
}

pub(super) fn read_client(r: &mut Lib0Reader<'_>) -> Scan<u64> {
    let client = r.var_u64()?;
    if client > MAX_CLIENT {
        return Err(Rejected::Malformed("client id beyond 2^53"));
    }
    Ok(client)
}

/// An item id (client, clock); clocks past what yrs can hold are refused.
pub(super) fn read_id(r: &mut Lib0Reader<'_>) -> Scan<(u64, u64)> {
    let (client, clock) = (read_client(r)?, r.var_u64()?);
    if clock > MAX_CLOCK {
        return Err(Rejected::Malformed("clock beyond 2^32"));
    }
    Ok((client, clock))
}
