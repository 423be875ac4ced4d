//! Client authentication: roles, SCRAM-SHA-256 verifiers and the start-up
//! exchange.
//!
//! Roles live in the catalog ([`RoleDef`]); a password is stored only as a
//! SCRAM-SHA-256 verifier in Postgres's format
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`), never in
//! clear. [`AuthMethod::Trust`] lets any user name in (the default while the
//! server listens on loopback only); [`AuthMethod::ScramSha256`] runs the
//! SASL exchange of RFC 5802 / RFC 7677 with pgwire's sans-I/O SCRAM server,
//! and a wrong password, an unknown user or a role without a password all end
//! with 28P01 after the same exchange, so a client cannot probe which users
//! exist.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret, ScramServerAuth};
use serde::{Deserialize, Serialize};

use crate::errors::PgError;

/// SCRAM iteration count for new verifiers (Postgres's default).
pub const SCRAM_ITERATIONS: usize = 4096;

/// The SASL mechanism offered.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// Any user name is accepted without a password.
    Trust,
    /// SCRAM-SHA-256 against the role's stored verifier.
    ScramSha256,
}

impl std::str::FromStr for AuthMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "trust" => Ok(AuthMethod::Trust),
            "scram-sha-256" | "scram" => Ok(AuthMethod::ScramSha256),
            other => Err(format!("'{other}': expected trust or scram-sha-256")),
        }
    }
}

/// A role (user), as kept in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleDef {
    /// May manage roles.
    pub superuser: bool,
    /// May connect.
    pub login: bool,
    /// SCRAM-SHA-256 verifier; `None`: no password (cannot log in with
    /// scram-sha-256).
    pub verifier: Option<String>,
}

/// Who a session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The role name.
    pub user: String,
    /// Whether the role is a superuser.
    pub superuser: bool,
}

/// A new SCRAM-SHA-256 verifier for `password`, with a random salt. A
/// password given as a verifier already (as `pg_dump` writes them) is kept.
pub fn make_verifier(password: &str) -> Result<String, PgError> {
    if parse_verifier(password).is_some() {
        return Ok(password.to_string());
    }
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| PgError::internal("no randomness for a password salt"))?;
    let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
    let ScramSecret::Verifier {
        stored_key,
        server_key,
        ..
    } = ScramSecret::verifier_from_salted_password(salt.to_vec(), salted, SCRAM_ITERATIONS)
    else {
        return Err(PgError::internal("SCRAM verifier"));
    };
    Ok(format!(
        "{SCRAM_SHA_256}${SCRAM_ITERATIONS}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    ))
}

/// Reads a verifier in Postgres's format.
pub fn parse_verifier(text: &str) -> Option<ScramSecret> {
    let rest = text.strip_prefix("SCRAM-SHA-256$")?;
    let (params, keys) = rest.split_once('$')?;
    let (iterations, salt) = params.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    let iterations: usize = iterations.parse().ok().filter(|i| *i > 0)?;
    let stored_key = STANDARD.decode(stored).ok().filter(|k| k.len() == 32)?;
    let server_key = STANDARD.decode(server).ok().filter(|k| k.len() == 32)?;
    Some(ScramSecret::Verifier {
        salt: STANDARD.decode(salt).ok()?,
        iterations,
        stored_key,
        server_key,
    })
}

/// A verifier no password matches, with a salt that is stable per user name
/// (so an unknown user looks like a known one on every attempt).
fn decoy_secret(user: &str, key: &[u8; 32]) -> ScramSecret {
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        user.as_bytes(),
    );
    let bytes = tag.as_ref();
    ScramSecret::Verifier {
        salt: bytes[..16].to_vec(),
        iterations: SCRAM_ITERATIONS,
        stored_key: bytes.to_vec(),
        server_key: bytes.to_vec(),
    }
}

/// One SCRAM exchange, as a state machine driven by the session with the
/// client's SASL messages (no I/O here).
pub struct ScramExchange {
    server: ScramServerAuth,
    secret: ScramSecret,
    state: ScramState,
    user: String,
}

enum ScramState {
    /// Waiting for SASLInitialResponse.
    Start,
    /// Server-first sent; waiting for the client-final message.
    Sent(Box<pgwire::api::auth::sasl::scram::ScramServerAuthWaitingForClientFinal>),
    /// Done (either way).
    Finished,
}

/// What to send after a client message.
pub enum ScramStep {
    /// AuthenticationSASLContinue with this payload.
    Continue(String),
    /// AuthenticationSASLFinal with this payload, then AuthenticationOk.
    Final(String),
}

impl ScramExchange {
    /// Starts an exchange for `user`, whose role (if any) is `role`.
    /// `decoy_key` salts the decoy verifier of unknown users.
    pub fn new(user: &str, role: Option<&RoleDef>, decoy_key: &[u8; 32]) -> Self {
        let secret = role
            .filter(|r| r.login)
            .and_then(|r| r.verifier.as_deref())
            .and_then(parse_verifier)
            .unwrap_or_else(|| decoy_secret(user, decoy_key));
        Self {
            server: ScramServerAuth::new(),
            secret,
            state: ScramState::Start,
            user: user.to_string(),
        }
    }

    fn failed(&self) -> PgError {
        PgError::new(
            "28P01",
            format!("password authentication failed for user \"{}\"", self.user),
        )
        .fatal()
    }

    /// SASLInitialResponse: the mechanism and the client-first message.
    pub fn on_initial(&mut self, mechanism: &str, data: &[u8]) -> Result<ScramStep, PgError> {
        if !matches!(self.state, ScramState::Start) {
            return Err(self.failed());
        }
        self.state = ScramState::Finished;
        if mechanism != SCRAM_SHA_256 {
            return Err(PgError::new(
                "28000",
                format!("SASL authentication mechanism {mechanism} is not supported"),
            )
            .fatal());
        }
        let secret = std::mem::replace(
            &mut self.secret,
            ScramSecret::SaltedPassword {
                salt: Vec::new(),
                salted_password: Vec::new(),
            },
        );
        match self
            .server
            .on_client_first_message_with_secret(data, secret)
        {
            Ok((first, waiting)) => {
                self.state = ScramState::Sent(Box::new(waiting));
                Ok(ScramStep::Continue(first))
            }
            Err(e) => Err(PgError::new("08P01", format!("invalid SCRAM message: {e}")).fatal()),
        }
    }

    /// SASLResponse: the client-final message with the proof.
    pub fn on_response(&mut self, data: &[u8]) -> Result<ScramStep, PgError> {
        let state = std::mem::replace(&mut self.state, ScramState::Finished);
        let ScramState::Sent(waiting) = state else {
            return Err(self.failed());
        };
        match waiting.on_client_final_message(data) {
            Ok(last) => Ok(ScramStep::Final(last)),
            Err(_) => Err(self.failed()),
        }
    }
}

/// Random bytes for decoy salts and secrets.
pub fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    // SystemRandom only fails when the OS has no randomness; a zero key then
    // only makes decoy salts predictable.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key);
    key
}

/// Parses the body of a SASLInitialResponse ('p' during SASL): mechanism,
/// then an int32 length and that many bytes (-1: none).
pub fn parse_initial_response(body: &[u8]) -> Option<(String, Vec<u8>)> {
    let end = body.iter().position(|&b| b == 0)?;
    let mechanism = std::str::from_utf8(&body[..end]).ok()?.to_string();
    let rest = &body[end + 1..];
    if rest.len() < 4 {
        return None;
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    match len {
        -1 if data.is_empty() => Some((mechanism, Vec::new())),
        n if n >= 0 && n as usize == data.len() => Some((mechanism, data.to_vec())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_round_trip_and_never_hold_the_password() {
        let v = make_verifier("s3cret").unwrap();
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
        assert!(!v.contains("s3cret"));
        assert!(parse_verifier(&v).is_some());
        assert_eq!(make_verifier(&v).unwrap(), v, "a verifier is kept as given");
        assert_ne!(make_verifier("s3cret").unwrap(), v, "salts differ");
        assert!(parse_verifier("SCRAM-SHA-256$x").is_none());
        assert!(parse_verifier("md5abc").is_none());
    }

    #[test]
    fn initial_response_parsing_is_bounded() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(
            parse_initial_response(&body),
            Some(("SCRAM-SHA-256".into(), b"abc".to_vec()))
        );
        body.pop();
        assert_eq!(parse_initial_response(&body), None);
        assert_eq!(parse_initial_response(b"x"), None);
    }
}
