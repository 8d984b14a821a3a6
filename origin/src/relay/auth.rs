//! Node authentication on the control stream: each side proves it knows the
//! cluster secret with an HMAC-SHA256 bound to this QUIC connection's TLS
//! session. The secret itself never crosses the wire.
//!
//! ```text
//! connecting → Hello{version, nonce_c}
//!            ← Challenge{nonce_s}
//! connecting → Auth{HMAC(secret, "cascade-relay/2 client" | X | nonce_c | nonce_s)}
//!            ← AuthOk{HMAC(secret, "cascade-relay/2 server" | X | nonce_c | nonce_s)}
//! ```
//!
//! `X` is the TLS exporter of the connection (RFC 5705/8446 §7.5, label
//! [`EXPORTER_LABEL`]): both ends compute the same `X` only if they share
//! one TLS session. A man in the middle that terminates TLS towards each
//! side (clients accept any certificate: there is no PKI between nodes)
//! holds two sessions with two different exporters, so proofs it forwards
//! byte for byte fail on the other side, and it cannot make its own without
//! the secret.
//!
//! Order: the connecting side proves itself first, and the accepting side
//! sends nothing derived from the secret before that proof verified. So a
//! stranger who connects to a node learns nothing it could test a guessed
//! secret against offline. The one value a guess can be tested against is a
//! client's `Auth`, and only by whoever the client dialled (a node in its
//! `--origin`, or a man in the middle on its path): that is why secrets are
//! at least 32 characters (`cascade secret` prints 256 random bits), which
//! no offline search reaches.
//!
//! The exchange itself is a sans-IO state machine ([`Connector`],
//! [`Acceptor`]: message in, reply out); [`connect`] and [`accept`] drive
//! it over the control stream.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::wire::{read_message, Message, Nonce, VERSION};
use crate::{Error, ProtocolError, Result};

type HmacSha256 = Hmac<Sha256>;

/// The TLS exporter label both ends derive the channel binding with.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-cascade-relay-auth";
/// Prefix of every proof: protocol and version, so a proof of one version
/// never verifies in another.
const PROOF_CONTEXT: &[u8] = b"cascade-relay/2 ";

/// The channel binding: the TLS exporter of one connection.
pub(crate) type Binding = [u8; 32];

/// Who proves: the two labels have the same length, so no input of one
/// reads as an input of the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Client => b"client",
            Self::Server => b"server",
        }
    }
}

/// Everything a proof covers: the secret (as the key), who proves, the
/// connection and both nonces.
fn mac(secret: &str, role: Role, binding: &Binding, client: &Nonce, server: &Nonce) -> HmacSha256 {
    // invariant: HMAC accepts keys of any length.
    let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("hmac takes any key length");
    m.update(PROOF_CONTEXT);
    m.update(role.label());
    m.update(binding);
    m.update(client);
    m.update(server);
    m
}

fn proof(secret: &str, role: Role, binding: &Binding, client: &Nonce, server: &Nonce) -> [u8; 32] {
    mac(secret, role, binding, client, server)
        .finalize()
        .into_bytes()
        .into()
}

fn verify(
    secret: &str,
    role: Role,
    binding: &Binding,
    client: &Nonce,
    server: &Nonce,
    given: &[u8; 32],
) -> bool {
    // Constant-time comparison inside `verify_slice`.
    mac(secret, role, binding, client, server)
        .verify_slice(given)
        .is_ok()
}

/// A fresh random nonce.
pub(crate) fn nonce() -> Nonce {
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

/// The channel binding of `conn` (its TLS session's exporter).
pub(crate) fn binding(conn: &quinn::Connection) -> Result<Binding> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| Error::Tls("TLS exporter unavailable".into()))?;
    Ok(out)
}

fn unexpected(expected: &'static str, got: &Message) -> Error {
    ProtocolError::UnexpectedMessage {
        expected,
        got: got.kind(),
    }
    .into()
}

/// What one step of the handshake produced.
#[derive(Debug, PartialEq)]
pub(crate) struct Step {
    /// The message to send, if any.
    pub(crate) send: Option<Message>,
    /// The peer is authenticated (and, if `send` is set, it goes last).
    pub(crate) done: bool,
}

/// The connecting side: says `Hello`, answers the challenge, then checks
/// the accepting side's proof.
pub(crate) struct Connector<'a> {
    secret: &'a str,
    binding: Binding,
    ours: Nonce,
    /// The accepting side's nonce once its challenge came.
    theirs: Option<Nonce>,
    done: bool,
}

impl<'a> Connector<'a> {
    pub(crate) fn new(secret: &'a str, binding: Binding, nonce: Nonce) -> Self {
        Self {
            secret,
            binding,
            ours: nonce,
            theirs: None,
            done: false,
        }
    }

    /// The first message.
    pub(crate) fn hello(&self) -> Message {
        Message::Hello {
            version: VERSION,
            nonce: self.ours,
        }
    }

    /// A message from the accepting side. An error ends the handshake.
    pub(crate) fn handle(&mut self, msg: Message) -> Result<Step> {
        match (self.theirs, msg) {
            (None, Message::Challenge { nonce }) => {
                self.theirs = Some(nonce);
                let p = proof(self.secret, Role::Client, &self.binding, &self.ours, &nonce);
                Ok(Step {
                    send: Some(Message::Auth { proof: p }),
                    done: false,
                })
            }
            (Some(theirs), Message::AuthOk { proof }) if !self.done => {
                if !verify(
                    self.secret,
                    Role::Server,
                    &self.binding,
                    &self.ours,
                    &theirs,
                    &proof,
                ) {
                    return Err(Error::Auth);
                }
                self.done = true;
                Ok(Step {
                    send: None,
                    done: true,
                })
            }
            (None, other) => Err(unexpected("challenge", &other)),
            (Some(_), other) => Err(unexpected("auth_ok", &other)),
        }
    }
}

/// The accepting side: answers `Hello` with a bare challenge and proves
/// itself only after the connecting side did.
pub(crate) struct Acceptor<'a> {
    secret: &'a str,
    binding: Binding,
    ours: Nonce,
    /// The connecting side's nonce once its hello came.
    theirs: Option<Nonce>,
    done: bool,
}

impl<'a> Acceptor<'a> {
    pub(crate) fn new(secret: &'a str, binding: Binding, nonce: Nonce) -> Self {
        Self {
            secret,
            binding,
            ours: nonce,
            theirs: None,
            done: false,
        }
    }

    /// A message from the connecting side. An error ends the handshake.
    pub(crate) fn handle(&mut self, msg: Message) -> Result<Step> {
        match (self.theirs, msg) {
            // The version was checked when the message was decoded.
            (None, Message::Hello { nonce, .. }) => {
                self.theirs = Some(nonce);
                Ok(Step {
                    send: Some(Message::Challenge { nonce: self.ours }),
                    done: false,
                })
            }
            (Some(theirs), Message::Auth { proof }) if !self.done => {
                if !verify(
                    self.secret,
                    Role::Client,
                    &self.binding,
                    &theirs,
                    &self.ours,
                    &proof,
                ) {
                    return Err(Error::Auth);
                }
                self.done = true;
                let p = proof_of(self.secret, &self.binding, &theirs, &self.ours);
                Ok(Step {
                    send: Some(Message::AuthOk { proof: p }),
                    done: true,
                })
            }
            (None, other) => Err(unexpected("hello", &other)),
            (Some(_), other) => Err(unexpected("auth", &other)),
        }
    }
}

/// The accepting side's proof (named apart so its one call site reads as
/// what it is: sent only after the peer's proof verified).
fn proof_of(secret: &str, binding: &Binding, client: &Nonce, server: &Nonce) -> [u8; 32] {
    proof(secret, Role::Server, binding, client, server)
}

async fn send(stream: &mut quinn::SendStream, msg: &Message) -> Result<()> {
    let bytes = msg.encode()?;
    stream
        .write_all(&bytes)
        .await
        .map_err(|e| ProtocolError::Write(e).into())
}

/// The connecting side of the handshake over `conn`'s control stream. The
/// caller bounds it in time.
pub(crate) async fn connect(
    conn: &quinn::Connection,
    send_s: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    secret: &str,
) -> Result<()> {
    let mut hs = Connector::new(secret, binding(conn)?, nonce());
    send(send_s, &hs.hello()).await?;
    loop {
        let step = hs.handle(read_message(recv).await?)?;
        if let Some(msg) = step.send {
            send(send_s, &msg).await?;
        }
        if step.done {
            return Ok(());
        }
    }
}

/// The accepting side of the handshake over `conn`'s control stream. The
/// caller bounds it in time.
pub(crate) async fn accept(
    conn: &quinn::Connection,
    send_s: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    secret: &str,
) -> Result<()> {
    let mut hs = Acceptor::new(secret, binding(conn)?, nonce());
    loop {
        let step = hs.handle(read_message(recv).await?)?;
        if let Some(msg) = step.send {
            send(send_s, &msg).await?;
        }
        if step.done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// Runs a handshake between `c` and `a` through `relay` (which may
    /// change what crosses): the outcome on each side.
    fn run(
        c: &mut Connector<'_>,
        a: &mut Acceptor<'_>,
        mut relay: impl FnMut(Message) -> Message,
    ) -> (Result<bool>, Result<bool>) {
        let mut to_a = Some(c.hello());
        let (mut c_done, mut a_done) = (false, false);
        for _ in 0..4 {
            let Some(m) = to_a.take() else { break };
            let step = match a.handle(relay(m)) {
                Ok(s) => s,
                Err(e) => return (Ok(c_done), Err(e)),
            };
            a_done = step.done;
            let Some(back) = step.send else { break };
            let step = match c.handle(relay(back)) {
                Ok(s) => s,
                Err(e) => return (Err(e), Ok(a_done)),
            };
            c_done = step.done;
            to_a = step.send;
        }
        (Ok(c_done), Ok(a_done))
    }

    #[test]
    fn same_secret_same_session_authenticates_both_sides() {
        let x = [9u8; 32];
        let mut c = Connector::new(SECRET, x, [1; 32]);
        let mut a = Acceptor::new(SECRET, x, [2; 32]);
        let (cr, ar) = run(&mut c, &mut a, |m| m);
        assert!(cr.unwrap() && ar.unwrap());
    }

    #[test]
    fn the_server_sends_nothing_secret_derived_before_the_client_proved_itself() {
        let x = [9u8; 32];
        let mut a = Acceptor::new(SECRET, x, [2; 32]);
        // A stranger's hello gets a bare nonce: nothing to test guesses on.
        let step = a
            .handle(Message::Hello {
                version: VERSION,
                nonce: [1; 32],
            })
            .unwrap();
        assert_eq!(
            step,
            Step {
                send: Some(Message::Challenge { nonce: [2; 32] }),
                done: false
            }
        );
        // A wrong proof ends it with nothing sent.
        let guess = proof("a guessed secret", Role::Client, &x, &[1; 32], &[2; 32]);
        assert!(matches!(
            a.handle(Message::Auth { proof: guess }),
            Err(Error::Auth)
        ));
        // A replayed hello or an early auth_ok is a protocol error.
        let mut a = Acceptor::new(SECRET, x, [2; 32]);
        assert!(matches!(
            a.handle(Message::AuthOk { proof: [0; 32] }),
            Err(Error::Protocol(ProtocolError::UnexpectedMessage {
                expected: "hello",
                ..
            }))
        ));
    }

    #[test]
    fn wrong_secret_fails_on_the_side_that_checks_it() {
        let x = [9u8; 32];
        // Client with the wrong secret: refused by the server.
        let mut c = Connector::new("wrong-secret-wrong-secret-wrong!!", x, [1; 32]);
        let mut a = Acceptor::new(SECRET, x, [2; 32]);
        let (cr, ar) = run(&mut c, &mut a, |m| m);
        assert!(!cr.unwrap());
        assert!(matches!(ar, Err(Error::Auth)));
        // A server without the secret never gets past the client's proof,
        // and whatever it answers then fails at the client.
        let mut c = Connector::new(SECRET, x, [1; 32]);
        let mut a = Acceptor::new("wrong-secret-wrong-secret-wrong!!", x, [2; 32]);
        let Step {
            send: Some(challenge),
            ..
        } = a.handle(c.hello()).unwrap()
        else {
            panic!("challenge expected");
        };
        let Message::Challenge { nonce } = challenge.clone() else {
            panic!("challenge expected");
        };
        c.handle(challenge).unwrap();
        let forged = proof(
            "wrong-secret-wrong-secret-wrong!!",
            Role::Server,
            &x,
            &[1; 32],
            &nonce,
        );
        assert!(matches!(
            c.handle(Message::AuthOk { proof: forged }),
            Err(Error::Auth)
        ));
    }

    #[test]
    fn a_relaying_man_in_the_middle_fails_because_of_the_exporter() {
        // The man in the middle terminates TLS on both sides: the client's
        // session and the server's session have different exporters. It
        // forwards every message byte for byte.
        let (client_side, server_side) = ([0xc1; 32], [0x5e; 32]);
        let mut c = Connector::new(SECRET, client_side, [1; 32]);
        let mut a = Acceptor::new(SECRET, server_side, [2; 32]);
        let forward = |m: Message| Message::decode(&m.encode().unwrap()).unwrap().unwrap().0;
        let (cr, ar) = run(&mut c, &mut a, forward);
        assert!(matches!(ar, Err(Error::Auth)), "server must refuse");
        assert!(!cr.unwrap(), "client never sees a valid server proof");
        // Leaving the exporter out of the proofs amounts to both sessions
        // having the same binding: then the very same relay passes. This is
        // the check the exporter adds.
        let mut c = Connector::new(SECRET, [0; 32], [1; 32]);
        let mut a = Acceptor::new(SECRET, [0; 32], [2; 32]);
        let (cr, ar) = run(&mut c, &mut a, forward);
        assert!(cr.unwrap() && ar.unwrap(), "without the binding it passes");
    }

    #[test]
    fn proofs_bind_secret_direction_connection_and_nonces() {
        let (x, a, b) = ([3u8; 32], nonce(), nonce());
        let p = proof(SECRET, Role::Server, &x, &a, &b);
        assert!(verify(SECRET, Role::Server, &x, &a, &b, &p));
        assert!(!verify("other", Role::Server, &x, &a, &b, &p));
        assert!(!verify(SECRET, Role::Client, &x, &a, &b, &p));
        assert!(!verify(SECRET, Role::Server, &x, &b, &a, &p));
        assert!(!verify(SECRET, Role::Server, &[4; 32], &a, &b, &p));
    }

    #[test]
    fn the_client_refuses_out_of_order_messages() {
        let mut c = Connector::new(SECRET, [0; 32], [1; 32]);
        assert!(matches!(
            c.handle(Message::AuthOk { proof: [0; 32] }),
            Err(Error::Protocol(ProtocolError::UnexpectedMessage {
                expected: "challenge",
                ..
            }))
        ));
        let mut c = Connector::new(SECRET, [0; 32], [1; 32]);
        c.handle(Message::Challenge { nonce: [2; 32] }).unwrap();
        assert!(matches!(
            c.handle(Message::Challenge { nonce: [2; 32] }),
            Err(Error::Protocol(ProtocolError::UnexpectedMessage {
                expected: "auth_ok",
                ..
            }))
        ));
    }

    fn handshake_message() -> impl proptest::strategy::Strategy<Value = Message> {
        use proptest::prelude::*;
        prop_oneof![
            any::<[u8; 32]>().prop_map(|nonce| Message::Hello {
                version: VERSION,
                nonce
            }),
            any::<[u8; 32]>().prop_map(|nonce| Message::Challenge { nonce }),
            any::<[u8; 32]>().prop_map(|proof| Message::Auth { proof }),
            any::<[u8; 32]>().prop_map(|proof| Message::AuthOk { proof }),
            Just(Message::Ended { id: 0 }),
        ]
    }

    proptest::proptest! {
        /// Whatever a stranger sends, in any order, neither side
        /// authenticates it, and the accepting side never answers with
        /// anything derived from the secret.
        #[test]
        fn strangers_never_authenticate(
            msgs in proptest::collection::vec(handshake_message(), 0..6)
        ) {
            let x = [9u8; 32];
            let mut a = Acceptor::new(SECRET, x, [2; 32]);
            for m in msgs.clone() {
                match a.handle(m) {
                    Ok(step) => {
                        proptest::prop_assert!(!step.done);
                        let proves = matches!(step.send, Some(Message::AuthOk { .. }));
                        proptest::prop_assert!(!proves);
                    }
                    Err(_) => break,
                }
            }
            let mut c = Connector::new(SECRET, x, [1; 32]);
            for m in msgs {
                match c.handle(m) {
                    Ok(step) => proptest::prop_assert!(!step.done),
                    Err(_) => break,
                }
            }
        }
    }
}
