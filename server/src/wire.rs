//! Checks a frontend message's body against the Postgres protocol's layout
//! before pgwire decodes it.
//!
//! pgwire's decoders read fields with `bytes::Buf` getters, which panic when a
//! body is shorter than its own counts say (a `Bind` that declares five
//! parameters and sends none). Every message type the session accepts after
//! start-up is checked here first: each field must fit, counts must not be
//! negative, and nothing may be left over (Postgres's "invalid message
//! format"). A message that fails is answered 08P01 and the connection is
//! closed.

/// Reads fields off a message body, failing instead of panicking.
struct Fields<'a> {
    body: &'a [u8],
    what: char,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.body.len() < n {
            return Err(format!(
                "invalid message format: '{}' message is shorter than its fields",
                self.what
            ));
        }
        let (head, tail) = self.body.split_at(n);
        self.body = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, String> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count: a non-negative int16.
    fn count(&mut self) -> Result<usize, String> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| format!("invalid message format: negative count {n}"))
    }

    fn cstring(&mut self) -> Result<(), String> {
        match self.body.iter().position(|&b| b == 0) {
            Some(end) => {
                self.body = &self.body[end + 1..];
                Ok(())
            }
            None => Err(format!(
                "invalid message format: unterminated string in '{}' message",
                self.what
            )),
        }
    }

    fn end(&self) -> Result<(), String> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "invalid message format: '{}' message has {} bytes left over",
                self.what,
                self.body.len()
            ))
        }
    }
}

/// Checks the body (after the tag and length) of a frontend message of type
/// `tag` sent after start-up. `Err` names what is wrong (SQLSTATE 08P01).
pub fn validate_frame(tag: u8, body: &[u8]) -> Result<(), String> {
    let mut f = Fields {
        body,
        what: char::from(tag),
    };
    match tag {
        // Query, CopyFail: one string.
        b'Q' | b'f' => f.cstring()?,
        // Parse: name, query, parameter type oids.
        b'P' => {
            f.cstring()?;
            f.cstring()?;
            let n = f.count()?;
            f.take(n * 4)?;
        }
        // Bind: portal, statement, parameter formats, parameters, result formats.
        b'B' => {
            f.cstring()?;
            f.cstring()?;
            let formats = f.count()?;
            f.take(formats * 2)?;
            let params = f.count()?;
            for _ in 0..params {
                let len = f.i32()?;
                if len >= 0 {
                    f.take(len as usize)?;
                } else if len != -1 {
                    return Err(format!("invalid message format: parameter length {len}"));
                }
            }
            let results = f.count()?;
            f.take(results * 2)?;
        }
        // Describe, Close: 'S' or 'P', then a name.
        b'D' | b'C' => {
            let target = f.u8()?;
            if target != b'S' && target != b'P' {
                return Err(format!(
                    "invalid {} message subtype {target}",
                    if tag == b'D' { "DESCRIBE" } else { "CLOSE" }
                ));
            }
            f.cstring()?;
        }
        // Execute: portal, row limit.
        b'E' => {
            f.cstring()?;
            f.i32()?;
        }
        // Sync, Flush, Terminate, CopyDone: empty.
        b'S' | b'H' | b'X' | b'c' => {}
        // CopyData and password/SASL messages: any bytes (read by their
        // own parsers).
        b'd' | b'p' => return Ok(()),
        other => {
            return Err(format!(
                "invalid frontend message type {}",
                if other.is_ascii_graphic() {
                    format!("'{}'", char::from(other))
                } else {
                    other.to_string()
                }
            ))
        }
    }
    f.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use pgwire::messages::{DecodeContext, PgWireFrontendMessage};

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Valid messages of every type the session reads.
    fn corpus() -> Vec<Vec<u8>> {
        let mut bind = b"p\0s\0".to_vec();
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&2i16.to_be_bytes());
        bind.extend_from_slice(&1i32.to_be_bytes());
        bind.push(b'7');
        bind.extend_from_slice(&(-1i32).to_be_bytes());
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&1i16.to_be_bytes());
        let mut parse = b"s\0SELECT $1, $2\0".to_vec();
        parse.extend_from_slice(&2i16.to_be_bytes());
        parse.extend_from_slice(&23u32.to_be_bytes());
        parse.extend_from_slice(&25u32.to_be_bytes());
        let mut execute = b"p\0".to_vec();
        execute.extend_from_slice(&10i32.to_be_bytes());
        vec![
            frame(b'Q', b"SELECT 1\0"),
            frame(b'P', &parse),
            frame(b'B', &bind),
            frame(b'D', b"Sname\0"),
            frame(b'C', b"Pp\0"),
            frame(b'E', &execute),
            frame(b'S', b""),
            frame(b'H', b""),
            frame(b'd', b"1\t2\n"),
            frame(b'c', b""),
            frame(b'f', b"oops\0"),
        ]
    }

    /// Decodes one frame the way the session does: validate, then pgwire.
    fn decode(frame: &[u8]) -> Result<PgWireFrontendMessage, String> {
        if frame.len() < 5 {
            return Err("short".into());
        }
        validate_frame(frame[0], &frame[5..])?;
        let mut buf = BytesMut::from(frame);
        let mut ctx = DecodeContext::default();
        ctx.awaiting_frontend_ssl = false;
        ctx.awaiting_frontend_startup = false;
        match PgWireFrontendMessage::decode(&mut buf, &ctx) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err("incomplete".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn every_valid_message_passes() {
        for f in corpus() {
            assert!(decode(&f).is_ok(), "{:?}", f);
        }
    }

    #[test]
    fn a_bind_that_declares_parameters_it_does_not_send_is_refused() {
        let mut bind = b"\0\0".to_vec();
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&5i16.to_be_bytes());
        assert!(validate_frame(b'B', &bind).is_err());
        let mut negative = b"\0\0".to_vec();
        negative.extend_from_slice(&(-3i16).to_be_bytes());
        assert!(validate_frame(b'B', &negative).is_err());
    }

    /// A bounded, repeatable fuzz of the decoder: 20,000 mutations of the
    /// corpus (bytes flipped, truncated, lengths patched to agree with the
    /// new size, fields duplicated). Each must be accepted or refused with an
    /// error; none may panic (a panic fails the test).
    #[test]
    fn mutated_messages_never_panic_the_decoder() {
        let corpus = corpus();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut refused = 0;
        for _ in 0..20_000 {
            let mut f = corpus[(next() % corpus.len() as u64) as usize].clone();
            for _ in 0..1 + next() % 4 {
                let body_len = f.len().saturating_sub(5);
                match next() % 4 {
                    0 if body_len > 0 => {
                        let i = 5 + (next() as usize % body_len);
                        f[i] = next() as u8;
                    }
                    1 if body_len > 0 => {
                        let keep = 5 + (next() as usize % body_len);
                        f.truncate(keep);
                    }
                    2 => {
                        let at = 5 + (next() as usize % (body_len + 1));
                        let extra: Vec<u8> = (0..next() % 6).map(|_| next() as u8).collect();
                        f.splice(at..at, extra);
                    }
                    _ if body_len > 1 => {
                        // A count or length field set to something large.
                        let i = 5 + (next() as usize % (body_len - 1));
                        f[i] = 0x7f;
                        f[i + 1] = 0xff;
                    }
                    _ => {}
                }
            }
            // Keep the frame length consistent with the bytes, as the
            // session's framing guarantees.
            let len = (f.len() - 1) as i32;
            f[1..5].copy_from_slice(&len.to_be_bytes());
            if decode(&f).is_err() {
                refused += 1;
            }
        }
        assert!(refused > 1_000, "the mutations hit the checks: {refused}");
    }
}
