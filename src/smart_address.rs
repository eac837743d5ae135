//! Auto BCC addresses (R15): one per (location, user), derived, not stored.
//! The token is an HMAC of location and user under a server secret (80 bits,
//! base32), so an address cannot be guessed or forged, stays the same across
//! restarts and "update email", and needs no connected mailbox to exist. The
//! address's shape comes from config: `crm+{token}@bcc.example.com`.

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

/// Bytes of the HMAC kept: 80 bits, 16 base32 characters.
const TOKEN_BYTES: usize = 10;
const TOKEN_CHARS: usize = 16;

#[derive(Clone)]
pub struct SmartAddresses {
    key: [u8; 32],
    /// The template around `{token}`, lower-cased.
    before: String,
    after: String,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "auto_bcc.address must be an address with one {{token}} in it, like \"crm+{{token}}@bcc.example.com\"; got {0:?}"
)]
pub struct TemplateError(String);

impl SmartAddresses {
    pub fn new(template: &str, key: [u8; 32]) -> Result<Self, TemplateError> {
        let lower = template.trim().to_ascii_lowercase();
        let Some((before, after)) = lower.split_once("{token}") else {
            return Err(TemplateError(template.into()));
        };
        let well_formed = !after.contains("{token}")
            && lower.matches('@').count() == 1
            && (before.contains('@') || after.contains('@'))
            && !lower.ends_with('@')
            && !lower.chars().any(|c| c.is_whitespace() || c.is_control());
        if !well_formed {
            return Err(TemplateError(template.into()));
        }
        Ok(Self {
            key,
            before: before.to_string(),
            after: after.to_string(),
        })
    }

    fn token(&self, location_id: &str, user_id: &str) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(b"auto-bcc\0");
        mac.update(location_id.as_bytes());
        mac.update(b"\0");
        mac.update(user_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        data_encoding::BASE32_NOPAD
            .encode(digest.get(..TOKEN_BYTES).unwrap_or(&digest))
            .to_ascii_lowercase()
    }

    /// The integration's smart address.
    pub fn address(&self, location_id: &str, user_id: &str) -> String {
        format!(
            "{}{}{}",
            self.before,
            self.token(location_id, user_id),
            self.after
        )
    }

    /// The token of an address of this shape (any case), if it is one.
    pub fn token_in(&self, address: &str) -> Option<String> {
        let lower = address.trim().to_ascii_lowercase();
        let token = lower
            .strip_prefix(&self.before)?
            .strip_suffix(&self.after)?;
        (token.len() == TOKEN_CHARS
            && token
                .chars()
                .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)))
        .then(|| token.to_string())
    }

    /// Whether `address` is the smart address of (location, user). The
    /// comparison takes the same time wherever the tokens differ.
    pub fn is_address_of(&self, address: &str, location_id: &str, user_id: &str) -> bool {
        let Some(token) = self.token_in(address) else {
            return false;
        };
        let expected = self.token(location_id, user_id);
        token.len() == expected.len()
            && token
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }

    /// The token of (location, user), to find them by it.
    pub fn token_of(&self, location_id: &str, user_id: &str) -> String {
        self.token(location_id, user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses() -> SmartAddresses {
        SmartAddresses::new("crm+{token}@BCC.example.com", [7; 32]).unwrap()
    }

    #[test]
    fn r15_an_address_is_stable_unguessable_and_recognized() {
        let smart = addresses();
        let address = smart.address("L1", "u1");
        assert_eq!(address, smart.address("L1", "u1"), "stable");
        assert!(address.starts_with("crm+") && address.ends_with("@bcc.example.com"));
        assert_eq!(address.len(), "crm+@bcc.example.com".len() + TOKEN_CHARS);
        assert_ne!(address, smart.address("L1", "u2"));
        assert_ne!(address, smart.address("L2", "u1"));
        // No ambiguity from joining: ("L1", "0u1") is not ("L10", "u1").
        assert_ne!(smart.address("L1", "0u1"), smart.address("L10", "u1"));
        assert_ne!(
            address,
            SmartAddresses::new("crm+{token}@bcc.example.com", [8; 32])
                .unwrap()
                .address("L1", "u1"),
            "another server secret, another address"
        );
        assert!(smart.is_address_of(&address.to_uppercase(), "L1", "u1"));
        assert!(!smart.is_address_of(&address, "L1", "u2"));
        let mut forged = address.clone();
        forged.replace_range(4..5, if &address[4..5] == "a" { "b" } else { "a" });
        assert!(!smart.is_address_of(&forged, "L1", "u1"), "a changed token");
        assert_eq!(smart.token_in("crm+short@bcc.example.com"), None);
        assert_eq!(smart.token_in("someone@bcc.example.com"), None);
    }

    #[test]
    fn templates_without_one_token_in_an_address_are_refused() {
        for bad in [
            "crm@bcc.example.com",
            "{token}{token}@x.test",
            "crm+{token}",
            "crm+{token}@",
            "a b+{token}@x.test",
        ] {
            assert!(SmartAddresses::new(bad, [0; 32]).is_err(), "{bad}");
        }
        assert!(SmartAddresses::new("{token}@bcc.example.com", [0; 32]).is_ok());
    }
}
