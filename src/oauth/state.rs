//! The `state` of a sign-in flow: what the flow is for (provider, location,
//! user, where to send the person back), signed with a key only the bridge
//! holds, valid for ten minutes. The PKCE verifier is derived from the same
//! key and the state's nonce, so nothing secret travels through the browser
//! and nothing needs storing but the nonce (to make the state good once).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit as _, Mac as _};
use oauth2::PkceCodeVerifier;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::model::Provider;

/// How long a person may take on the provider's consent screen.
pub const STATE_LIFETIME_SECS: i64 = 10 * 60;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowState {
    pub nonce: String,
    pub provider: Provider,
    pub location_id: String,
    pub user_id: String,
    pub return_to: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the sign-in state is malformed")]
    Malformed,
    #[error("the sign-in state was not issued by this bridge or was altered")]
    Forged,
}

#[derive(Clone)]
pub struct StateSigner {
    key: [u8; 32],
}

impl std::fmt::Debug for StateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateSigner(<key>)")
    }
}

impl StateSigner {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn mac(&self, purpose: &str, payload: &[u8]) -> Hmac<Sha256> {
        // A 32-byte key always fits HMAC-SHA256.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(payload);
        mac
    }

    /// `base64url(json).base64url(hmac)`.
    pub fn sign(&self, state: &FlowState) -> String {
        let payload = serde_json::to_vec(state).unwrap_or_default();
        let tag = self.mac("state", &payload).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The state, if this bridge signed it unaltered. Expiry and single use
    /// are the caller's to check (it needs `return_to` to report them).
    pub fn verify(&self, token: &str) -> Result<FlowState, StateError> {
        let (payload, tag) = token.split_once('.').ok_or(StateError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| StateError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| StateError::Malformed)?;
        self.mac("state", &payload)
            .verify_slice(&tag)
            .map_err(|_| StateError::Forged)?;
        serde_json::from_slice(&payload).map_err(|_| StateError::Malformed)
    }

    /// The flow's PKCE verifier (43 characters of base64url, RFC 7636 4.1).
    pub fn verifier(&self, nonce: &str) -> PkceCodeVerifier {
        let bytes = self.mac("pkce", nonce.as_bytes()).finalize().into_bytes();
        PkceCodeVerifier::new(URL_SAFE_NO_PAD.encode(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> FlowState {
        FlowState {
            nonce: "n1".into(),
            provider: Provider::Gmail,
            location_id: "L1".into(),
            user_id: "u1".into(),
            return_to: Some("https://crm.example/done".into()),
            expires_at: 1_900_000_000,
        }
    }

    #[test]
    fn a_signed_state_verifies_and_any_change_is_refused() {
        let signer = StateSigner::new([7; 32]);
        let token = signer.sign(&state());
        assert_eq!(signer.verify(&token), Ok(state()));

        let (payload, tag) = token.split_once('.').unwrap();
        let mut other = state();
        other.location_id = "L2".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap());
        assert_eq!(
            signer.verify(&format!("{forged_payload}.{tag}")),
            Err(StateError::Forged)
        );
        assert_eq!(
            StateSigner::new([8; 32]).verify(&token),
            Err(StateError::Forged)
        );
        assert_eq!(signer.verify(payload), Err(StateError::Malformed));
        assert_eq!(signer.verify("%%.%%"), Err(StateError::Malformed));
    }

    #[test]
    fn the_pkce_verifier_is_fixed_per_nonce_and_well_formed() {
        let signer = StateSigner::new([7; 32]);
        let a = signer.verifier("n1");
        assert_eq!(a.secret(), signer.verifier("n1").secret());
        assert_ne!(a.secret(), signer.verifier("n2").secret());
        assert_eq!(a.secret().len(), 43);
        assert!(
            a.secret()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
