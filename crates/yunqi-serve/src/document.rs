//! Signed documents (电子证照, 电子通行凭证): what a granted application gets, verifiable by anyone
//! — online against the server, or offline with the published public key.
//!
//! A document is a compact token, `base64url(claims as JSON) "." base64url(Ed25519 signature
//! of the first part)`, a few hundred bytes: it fits a QR code. The server's signing key is 32
//! random bytes in `DIR/keys/documents.ed25519` (mode 0600), made at first start; its public
//! key is served at `GET /api/v1/documents/public-key`, and `kid` (the first 8 bytes of its
//! SHA-256, hex) names it in every token, so a key can be rotated and old documents still
//! verified against the key they name.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use sha2::Digest;
use yunqi_types::Error;

/// Longest token accepted for verification.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// What a document says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// The decision it was issued by (`department.service/number`).
    pub id: String,
    /// The service.
    pub service: String,
    /// Its title.
    pub title: String,
    /// The fields it shows (e.g. plate, date, window).
    pub fields: BTreeMap<String, String>,
    /// Valid from (inclusive), if limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<DateTime<Utc>>,
    /// Valid until (exclusive), if limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<DateTime<Utc>>,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// The signing key's id.
    pub kid: String,
}

/// The server's document key.
pub struct Signer {
    key: SigningKey,
    kid: String,
}

fn kid_of(public: &VerifyingKey) -> String {
    hex::encode(&sha2::Sha256::digest(public.as_bytes())[..8])
}

impl Signer {
    /// Loads the key from `path`, making one first if there is none.
    pub fn open(path: &Path) -> Result<Signer, Error> {
        let io = |e: std::io::Error, what: &str| {
            Error::internal(format!("document key {}: {what}: {e}", path.display()))
        };
        let seed: [u8; 32] = match std::fs::read(path) {
            Ok(b) => b.try_into().map_err(|_| {
                Error::internal(format!("document key {} is not 32 bytes", path.display())).hint(
                    "restore it from a backup; a new key would make issued documents unverifiable",
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed)
                    .map_err(|e| Error::internal(format!("no randomness for a key: {e}")))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io(e, "create its directory"))?;
                }
                let tmp = path.with_extension("tmp");
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)
                        .map_err(|e| io(e, "create"))?;
                    f.write_all(&seed).map_err(|e| io(e, "write"))?;
                    f.sync_all().map_err(|e| io(e, "sync"))?;
                }
                std::fs::rename(&tmp, path).map_err(|e| io(e, "publish"))?;
                seed
            }
            Err(e) => return Err(io(e, "read")),
        };
        let key = SigningKey::from_bytes(&seed);
        let kid = kid_of(&key.verifying_key());
        Ok(Signer { key, kid })
    }

    /// The public key, base64url.
    pub fn public_key(&self) -> String {
        B64.encode(self.key.verifying_key().as_bytes())
    }

    /// The key's id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Checks a token against this key (online verification).
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        verify_with(token, &self.key.verifying_key())
    }

    /// Signs claims (their `kid` is set to this key's) into a token.
    pub fn issue(&self, mut claims: Claims) -> Result<String, Error> {
        claims.kid = self.kid.clone();
        let body = B64.encode(
            serde_json::to_vec(&claims)
                .map_err(|e| Error::internal(format!("encode a document: {e}")))?,
        );
        let sig = self.key.sign(body.as_bytes());
        Ok(format!("{body}.{}", B64.encode(sig.to_bytes())))
    }
}

/// Checks a token's signature against `public_key` (base64url) and returns what it says.
/// Validity dates are the caller's to compare with now.
pub fn verify(token: &str, public_key: &str) -> Result<Claims, Error> {
    let hint = "use the key published at /api/v1/documents/public-key";
    let key: [u8; 32] = B64
        .decode(public_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::invalid("the public key is not 32 bytes of base64url").hint(hint))?;
    let key = VerifyingKey::from_bytes(&key)
        .map_err(|_| Error::invalid("the public key is not an Ed25519 key").hint(hint))?;
    verify_with(token, &key)
}

fn verify_with(token: &str, key: &VerifyingKey) -> Result<Claims, Error> {
    let bad = |why: &str| {
        Error::invalid(format!("the document is not valid: {why}"))
            .hint("scan or paste the whole token, as issued")
    };
    if token.len() > TOKEN_BYTES_MAX {
        return Err(bad("too long"));
    }
    let (body, sig) = token
        .trim()
        .split_once('.')
        .ok_or_else(|| bad("no signature"))?;
    let sig: [u8; 64] = B64
        .decode(sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("the signature is malformed"))?;
    key.verify(body.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| bad("the signature does not match (altered, or signed by another key)"))?;
    let claims: Claims = B64
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("its content is malformed"))?;
    if claims.kid != kid_of(key) {
        return Err(bad("it names another key"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/documents.ed25519");
        let signer = Signer::open(&path).unwrap();
        assert_eq!(
            Signer::open(&path).unwrap().public_key(),
            signer.public_key(),
            "the key is kept"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let claims = Claims {
            id: "traffic.urgent-entry-permit/7".into(),
            service: "traffic.urgent-entry-permit".into(),
            title: "非浙A急事通 电子通行凭证".into(),
            fields: BTreeMap::from([("plate".into(), "沪B12345".into())]),
            valid_from: Some("2026-12-01T00:00:00+08:00".parse().unwrap()),
            valid_to: Some("2026-12-02T00:00:00+08:00".parse().unwrap()),
            issued_at: "2026-11-26T10:00:00Z".parse().unwrap(),
            kid: String::new(),
        };
        let token = signer.issue(claims.clone()).unwrap();
        assert!(token.len() < 600, "fits a QR code: {} bytes", token.len());
        let back = verify(&token, &signer.public_key()).unwrap();
        assert_eq!(back.fields, claims.fields);
        assert_eq!(back.kid, signer.kid());
        // Any change to the content breaks the signature.
        let (body, sig) = token.split_once('.').unwrap();
        let mut c: Claims = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        c.fields.insert("plate".into(), "沪B99999".into());
        let forged = format!("{}.{sig}", B64.encode(serde_json::to_vec(&c).unwrap()));
        assert!(
            verify(&forged, &signer.public_key())
                .unwrap_err()
                .message
                .contains("does not match")
        );
        // Another key does not verify it.
        let other = Signer::open(&dir.path().join("other")).unwrap();
        assert!(verify(&token, &other.public_key()).is_err());
        assert!(verify("garbage", &signer.public_key()).is_err());
    }
}
