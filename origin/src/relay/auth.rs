//! Node authentication on the control stream: each side proves it knows the
//! cluster secret with an HMAC-SHA256 over the other side's random nonce.
//! The secret itself never crosses the wire.
//!
//! ```text
//! connecting → Hello{nonce_c}
//!            ← Challenge{nonce_s, HMAC(secret, "server" | nonce_c | nonce_s)}
//! connecting → Auth{HMAC(secret, "client" | nonce_s | nonce_c)}
//!            ← AuthOk
//! ```

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::wire::{read_message, Message, Nonce, VERSION};
use crate::{Error, ProtocolError, Result};

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, label: &[u8], first: &Nonce, second: &Nonce) -> HmacSha256 {
    // invariant: HMAC accepts keys of any length.
    let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("hmac takes any key length");
    m.update(label);
    m.update(first);
    m.update(second);
    m
}

fn proof(secret: &str, label: &[u8], first: &Nonce, second: &Nonce) -> [u8; 32] {
    mac(secret, label, first, second)
        .finalize()
        .into_bytes()
        .into()
}

fn verify(secret: &str, label: &[u8], first: &Nonce, second: &Nonce, given: &[u8; 32]) -> bool {
    // Constant-time comparison inside `verify_slice`.
    mac(secret, label, first, second)
        .verify_slice(given)
        .is_ok()
}

fn nonce() -> Nonce {
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn unexpected(expected: &'static str, got: &Message) -> Error {
    ProtocolError::UnexpectedMessage {
        expected,
        got: got.kind(),
    }
    .into()
}

async fn send(stream: &mut quinn::SendStream, msg: &Message) -> Result<()> {
    let bytes = msg.encode()?;
    stream
        .write_all(&bytes)
        .await
        .map_err(|e| ProtocolError::Write(e).into())
}

/// The connecting side of the handshake. The caller bounds it in time.
pub(crate) async fn connect(
    send_s: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    secret: &str,
) -> Result<()> {
    let ours = nonce();
    send(
        send_s,
        &Message::Hello {
            version: VERSION,
            nonce: ours,
        },
    )
    .await?;
    let (theirs, p) = match read_message(recv).await? {
        Message::Challenge { nonce, proof } => (nonce, proof),
        other => return Err(unexpected("challenge", &other)),
    };
    if !verify(secret, b"server", &ours, &theirs, &p) {
        return Err(Error::Auth);
    }
    send(
        send_s,
        &Message::Auth {
            proof: proof(secret, b"client", &theirs, &ours),
        },
    )
    .await?;
    match read_message(recv).await? {
        Message::AuthOk => Ok(()),
        other => Err(unexpected("auth_ok", &other)),
    }
}

/// The accepting side of the handshake. The caller bounds it in time.
pub(crate) async fn accept(
    send_s: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    secret: &str,
) -> Result<()> {
    let theirs = match read_message(recv).await? {
        Message::Hello { nonce, .. } => nonce,
        other => return Err(unexpected("hello", &other)),
    };
    let ours = nonce();
    send(
        send_s,
        &Message::Challenge {
            nonce: ours,
            proof: proof(secret, b"server", &theirs, &ours),
        },
    )
    .await?;
    let p = match read_message(recv).await? {
        Message::Auth { proof } => proof,
        other => return Err(unexpected("auth", &other)),
    };
    if !verify(secret, b"client", &ours, &theirs, &p) {
        return Err(Error::Auth);
    }
    send(send_s, &Message::AuthOk).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_and_direction() {
        let (a, b) = (nonce(), nonce());
        let p = proof("s3cret", b"server", &a, &b);
        assert!(verify("s3cret", b"server", &a, &b, &p));
        assert!(!verify("other", b"server", &a, &b, &p));
        assert!(!verify("s3cret", b"client", &a, &b, &p));
        assert!(!verify("s3cret", b"server", &b, &a, &p));
    }
}
