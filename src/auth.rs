//! Client authentication: JWT (HS256 or RS256) checked before the WebSocket upgrade.

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{glob_match, AuthConfig};

/// Who a connection belongs to and what it may join.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `sub`, or `None` when anonymous.
    pub user: Option<String>,
    /// Channel patterns from the `channels` claim; `None` allows every channel.
    pub channels: Option<Vec<String>>,
    /// `exp` in unix seconds.
    pub expires_at: Option<u64>,
    /// The `info` claim, shown to others in presence (any JSON).
    pub info: Option<serde_json::Value>,
    /// Channel patterns from the `publish` claim. `None` only without a token (auth off): then
    /// the `[[channels]]` config alone decides where a client may publish. With a token, a
    /// missing claim is an empty list: such a client publishes nowhere.
    pub publish: Option<Vec<String>>,
}

impl Identity {
    /// Whether this identity may subscribe to `channel`.
    pub fn may_join(&self, channel: &str) -> bool {
        match &self.channels {
            None => true,
            Some(patterns) => patterns.iter().any(|p| glob_match(p, channel)),
        }
    }

    /// Whether this identity's token lets it publish to `channel` (the `publish` claim; the
    /// `channels` claim, which is about subscribing, plays no part). Whether the channel takes
    /// client publishes at all is the config's to say.
    pub fn may_publish(&self, channel: &str) -> bool {
        match &self.publish {
            None => true,
            Some(patterns) => patterns.iter().any(|p| glob_match(p, channel)),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    channels: Option<Vec<String>>,
    info: Option<serde_json::Value>,
    publish: Option<Vec<String>>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in `?token=` or `Authorization: Bearer`.
    #[error("a token is required (?token= or Authorization: Bearer)")]
    Missing,
    /// The token did not verify.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Verifies tokens; `None` inside means auth is off.
pub struct Authenticator {
    verifier: Option<(DecodingKey, Validation)>,
}

impl Authenticator {
    /// Builds from config.
    ///
    /// # Errors
    /// When the RS256 key file cannot be read or parsed.
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let (key, alg) = if !cfg.jwt_secret.is_empty() {
            (
                DecodingKey::from_secret(cfg.jwt_secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if !cfg.jwt_public_key.is_empty() {
            let pem = std::fs::read(&cfg.jwt_public_key)?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                anyhow::anyhow!("config key `auth.jwt_public_key`: not an RSA public key PEM: {e}")
            })?;
            (key, Algorithm::RS256)
        } else {
            return Ok(Self { verifier: None });
        };
        let mut validation = Validation::new(alg);
        // Tokens without `exp` are accepted (they never expire); `exp` and `nbf` are checked
        // when present, without leeway, so that expiry closes the connection on time.
        validation.required_spec_claims = HashSet::new();
        validation.leeway = 0;
        validation.validate_nbf = true;
        // A configured audience or issuer must be present in the token, not only right when
        // present.
        if cfg.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&cfg.audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        if !cfg.issuer.is_empty() {
            validation.set_issuer(&[&cfg.issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Self {
            verifier: Some((key, validation)),
        })
    }

    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Checks a token (when auth is on) and returns the identity.
    ///
    /// # Errors
    /// [`AuthError`] when auth is on and the token is missing or bad.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let Some((key, validation)) = &self.verifier else {
            return Ok(Identity::default());
        };
        let token = token.ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Identity {
            user: data.claims.sub,
            channels: data.claims.channels,
            expires_at: data.claims.exp,
            info: data.claims.info,
            publish: Some(data.claims.publish.unwrap_or_default()),
        })
    }
}
