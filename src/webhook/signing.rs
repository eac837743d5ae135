//! Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(`id.timestamp.body`))
//! under the base64 key that follows `whsec_`.

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<secret>)")
    }
}

impl SigningKey {
    /// Reads a `whsec_…` secret (the prefix is optional, as in the reference libraries).
    pub fn from_secret(secret: &str) -> anyhow::Result<Self> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = BASE64
            .decode(encoded)
            .map_err(|e| anyhow::anyhow!("webhook secret is not whsec_ + base64: {e}"))?;
        anyhow::ensure!(!key.is_empty(), "webhook secret is empty");
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header value.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!(
            "v1,{}",
            BASE64.encode(self.mac(id, timestamp, body).finalize().into_bytes())
        )
    }

    /// Checks a `webhook-signature` header (space-separated `v1,…` entries) in constant time.
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        header
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b| BASE64.decode(b).ok())
            .any(|raw| self.mac(id, timestamp, body).verify_slice(&raw).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks specification's reference tests.
    #[test]
    fn matches_the_specification_vector() {
        let key = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(key.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            &signature
        ));
        assert!(!key.verify(
            "msg_other",
            1614265330,
            br#"{"test": 2432232314}"#,
            &signature
        ));
    }

    #[test]
    fn rejects_bad_secrets() {
        assert!(SigningKey::from_secret("whsec_!!!").is_err());
        assert!(SigningKey::from_secret("whsec_").is_err());
    }
}
