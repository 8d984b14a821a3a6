//! Just enough STUN (RFC 5389) to route a datagram: recognise a binding
//! request and read the local ufrag out of its USERNAME attribute, and check
//! its MESSAGE-INTEGRITY before its source address is trusted.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// STUN's magic cookie (RFC 5389 §6).
const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const HEADER: usize = 20;
const ATTR_USERNAME: u16 = 0x0006;
/// Longest USERNAME we accept: RFC 8445 ufrags are ≤ 256 chars each.
const MAX_USERNAME: usize = 513;

/// True if `buf` looks like a STUN message (RFC 7983 demultiplexing: first
/// byte 0–3, magic cookie in place).
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER && buf[0] < 4 && buf[4..8] == MAGIC
}

/// The local ufrag of a binding request: USERNAME is `local:remote` as seen
/// by the receiver (RFC 8445 §7.2.2). `None` for anything else.
pub fn local_ufrag(buf: &[u8]) -> Option<&str> {
    if !is_stun(buf) {
        return None;
    }
    // Binding request: method 0x001, class request.
    if u16::from_be_bytes([buf[0], buf[1]]) != 0x0001 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let body = buf.get(HEADER..HEADER.checked_add(len)?)?;
    let mut at = 0usize;
    while at + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + alen)?;
        if typ == ATTR_USERNAME {
            if alen > MAX_USERNAME {
                return None;
            }
            let s = std::str::from_utf8(value).ok()?;
            return s.split(':').next().filter(|u| !u.is_empty());
        }
        // Attributes are padded to 4 bytes.
        at += 4 + alen.div_ceil(4) * 4;
    }
    None
}

/// True when `buf` is a binding request whose MESSAGE-INTEGRITY matches
/// `password` (our local ICE password: RFC 8445 short-term credentials).
pub fn verified(buf: &[u8], password: &str) -> bool {
    if local_ufrag(buf).is_none() {
        return false;
    }
    let Ok(msg) = str0m::ice::StunMessage::parse(buf) else {
        return false;
    };
    msg.is_binding_request() && msg.verify(password.as_bytes(), sha1_hmac)
}

fn sha1_hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    // invariant: HMAC accepts keys of any length.
    #[allow(clippy::unwrap_used)]
    let mut mac = Hmac::<Sha1>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn reads_local_ufrag() {
        let m = binding_request("abcd:efgh");
        assert!(is_stun(&m));
        assert_eq!(local_ufrag(&m), Some("abcd"));
    }

    #[test]
    fn rejects_non_stun() {
        assert_eq!(local_ufrag(&[0x80; 40]), None);
        assert_eq!(local_ufrag(&[]), None);
        let mut m = binding_request("a:b");
        m[1] = 0x11; // indication, not request
        assert_eq!(local_ufrag(&m), None);
    }

    /// A binding request as a browser sends it, signed with `pass`.
    pub(crate) fn signed_request(username: &str, pass: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 1500];
        let trans = str0m::ice::TransId::new();
        let msg = str0m::ice::StunMessage::binding_request(username, trans, true, 0, 1234, false);
        let n = msg
            .to_bytes(Some(pass.as_bytes()), &mut buf, sha1_hmac)
            .unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn integrity() {
        let m = signed_request("abcd:efgh", "secret-password-22chars");
        assert_eq!(local_ufrag(&m), Some("abcd"));
        assert!(verified(&m, "secret-password-22chars"));
        assert!(!verified(&m, "wrong-password-22charsx"));
        let mut bad = m.clone();
        let last = bad.len() - 9;
        bad[last] ^= 1;
        assert!(!verified(&bad, "secret-password-22chars"), "tampered");
        // No MESSAGE-INTEGRITY at all.
        assert!(!verified(&binding_request("abcd:efgh"), "x"));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = local_ufrag(&data);
            let _ = verified(&data, "password");
        }

        #[test]
        fn never_panics_with_valid_header(tail in proptest::collection::vec(any::<u8>(), 0..300), len in 0u16..400) {
            let mut m = vec![0x00, 0x01];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend_from_slice(&MAGIC);
            m.extend_from_slice(&[0; 12]);
            m.extend_from_slice(&tail);
            let _ = local_ufrag(&m);
        }
    }
}
