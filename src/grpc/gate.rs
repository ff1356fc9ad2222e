//! What every call passes through before it reaches the scheduler, and what is counted after:
//! authentication (bearer tokens, compared by SHA-256 hash in constant time), tenancy (an app
//! token only touches its own app), per-app rate limits (token buckets), and the request
//! metrics. The handlers in `services` run inside [`Gate::call`].

use crate::metrics::Metrics;
use crate::Error;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::{Choice, ConstantTimeEq};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

/// The SHA-256 hash of a bearer token; the configuration holds only these.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// The hash of `token`.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses `sha256:<64 hex digits>`, as `Display` writes it.
    pub fn parse(s: &str) -> Result<TokenHash, String> {
        let hex = s
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("sha256:"))
            .map(|_| &s[7..])
            .ok_or_else(|| {
            "expected sha256:<64 hex digits> (`roomsched config hash-token` prints it), never the token itself".to_string()
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "expected 64 hex digits after sha256:, got {:?}",
                hex
            ));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        if TokenHash(out) == TokenHash::of("") {
            return Err("this is the hash of the empty token, which is never accepted".into());
        }
        Ok(TokenHash(out))
    }
}

impl std::fmt::Display for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// Who may call. With no token configured at all, every call is allowed.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Tokens that may do everything.
    pub admin: Vec<TokenHash>,
    /// Tokens that may touch only their app (a token may be listed for several apps).
    pub apps: Vec<(String, TokenHash)>,
    /// Whether GetConnectionInfo / WatchConnectionInfo need a token (game clients call them,
    /// so they are open by default).
    pub connection_info_needs_token: bool,
}

impl AuthConfig {
    /// No token is configured: every call is allowed.
    pub fn is_open(&self) -> bool {
        self.admin.is_empty() && self.apps.is_empty()
    }
}

/// A sustained rate with a burst on top.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// Requests per second allowed per app.
#[derive(Debug, Clone, Default)]
pub struct RateLimitConfig {
    /// For apps not listed in `apps` (None: no limit).
    pub default: Option<Rate>,
    pub apps: HashMap<String, Rate>,
}

/// What a call does, for access checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Everything but the two below.
    Manage,
    /// GetConnectionInfo and WatchConnectionInfo: open unless configured otherwise.
    ConnectionInfo,
}

/// When there are this many buckets, full ones (apps idle for a while, which behave exactly
/// like a new bucket) are dropped, so callers inventing app ids cannot grow memory without
/// bound; the next pruning waits until the count has doubled again.
const PRUNE_BUCKETS_AT: usize = 10_000;

struct Bucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.rate.per_second).min(f64::from(self.rate.burst));
        self.last = now;
    }
}

/// Authentication, tenancy, rate limits and request metrics of the gRPC services.
pub struct Gate {
    auth: AuthConfig,
    rates: RateLimitConfig,
    buckets: DashMap<String, Bucket>,
    /// Bucket count at which full buckets are dropped next.
    prune_at: AtomicUsize,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("auth", &self.auth)
            .field("rates", &self.rates)
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(auth: AuthConfig, rates: RateLimitConfig, metrics: Option<Arc<Metrics>>) -> Gate {
        Gate {
            auth,
            rates,
            buckets: DashMap::new(),
            prune_at: AtomicUsize::new(PRUNE_BUCKETS_AT),
            metrics,
        }
    }

    /// A gate that lets everything through and counts nothing (the library's behaviour).
    pub fn open() -> Gate {
        Gate::new(AuthConfig::default(), RateLimitConfig::default(), None)
    }

    /// Checks the caller of `method` against the app the request names, runs `handle` if it
    /// may, and counts the outcome.
    pub(crate) async fn call<Req, T, Fut>(
        &self,
        method: &'static str,
        access: Access,
        req: Request<Req>,
        app_id: impl Fn(&Req) -> &str,
        handle: impl FnOnce(Req) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let app = app_id(req.get_ref());
        let result = match self.admit(access, req.metadata(), app) {
            Ok(()) => handle(req.into_inner()).await,
            Err(err) => {
                // Refusals of a rate limit can come by the thousand: not at info.
                if matches!(err, Error::ResourceExhausted { .. }) {
                    tracing::debug!(app_id = app, %err, "call refused");
                } else {
                    tracing::info!(app_id = app, %err, "call refused");
                }
                Err(Status::from(err))
            }
        };
        if let Some(metrics) = &self.metrics {
            metrics.request_done(method, result.as_ref().err(), started.elapsed());
        }
        result.map(Response::new)
    }

    fn admit(&self, access: Access, metadata: &MetadataMap, app_id: &str) -> Result<(), Error> {
        if self.auth.is_open() {
            return self.take_token(app_id, false);
        }
        if access == Access::ConnectionInfo && !self.auth.connection_info_needs_token {
            // Open to anyone; a caller with a valid token still counts as the app's own.
            let anonymous = self.authorize(metadata, app_id).is_err();
            return self.take_token(app_id, anonymous);
        }
        self.authorize(metadata, app_id)?;
        self.take_token(app_id, false)
    }

    fn authorize(&self, metadata: &MetadataMap, app_id: &str) -> Result<(), Error> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Error::Unauthenticated(
                    "missing credentials: send the metadata `authorization: Bearer <token>`".into(),
                )
            })?;
        let presented = TokenHash::of(token);
        // Every configured hash is compared, so the time taken does not depend on which
        // (if any) matched.
        let mut admin = Choice::from(0);
        for hash in &self.auth.admin {
            admin |= hash.0.ct_eq(&presented.0);
        }
        let (mut known, mut allowed) = (admin, admin);
        for (app, hash) in &self.auth.apps {
            let matches = hash.0.ct_eq(&presented.0);
            known |= matches;
            allowed |= matches & Choice::from(u8::from(app == app_id));
        }
        if bool::from(allowed) {
            Ok(())
        } else if bool::from(known) {
            Err(Error::PermissionDenied(format!(
                "this token may not access app {app_id:?}"
            )))
        } else {
            Err(Error::Unauthenticated("unknown token".into()))
        }
    }

    /// Takes one request from the app's bucket, or says when the next one is due. Calls that
    /// need no token (connection info, when tokens are configured) have a bucket of their own
    /// per app, so anonymous callers cannot use up the limit of the app's own callers.
    fn take_token(&self, app_id: &str, anonymous: bool) -> Result<(), Error> {
        let Some(rate) = self.rates.apps.get(app_id).or(self.rates.default.as_ref()) else {
            return Ok(());
        };
        // A malformed app id is refused by the scheduler; it gets no bucket.
        if crate::core::validate_app_id(app_id).is_err() {
            return Ok(());
        }
        let key = if anonymous {
            // App ids never contain '/'.
            std::borrow::Cow::Owned(format!("{app_id}/anonymous"))
        } else {
            std::borrow::Cow::Borrowed(app_id)
        };
        let now = Instant::now();
        let prune_at = self.prune_at.load(Ordering::Relaxed);
        if self.buckets.len() >= prune_at && !self.buckets.contains_key(key.as_ref()) {
            self.buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < f64::from(b.rate.burst)
            });
            let next = (2 * self.buckets.len()).max(PRUNE_BUCKETS_AT);
            self.prune_at.store(next, Ordering::Relaxed);
        }
        let mut bucket = self.buckets.entry(key.into_owned()).or_insert(Bucket {
            rate: *rate,
            tokens: f64::from(rate.burst),
            last: now,
        });
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / rate.per_second;
        Err(Error::ResourceExhausted {
            message: format!(
                "app {app_id:?} is over its rate limit ({} requests per second, burst {}); retry in {} ms",
                rate.per_second,
                rate.burst,
                (wait * 1000.0).ceil()
            ),
            retry_after: Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_round_trip_and_reject_tokens() {
        let h = TokenHash::of("secret");
        assert_eq!(
            h.to_string(),
            "sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert_eq!(TokenHash::parse(&h.to_string()).unwrap(), h);
        assert!(TokenHash::parse("secret").is_err());
        assert_eq!(TokenHash::parse(&h.to_string().to_uppercase()).unwrap(), h);
        assert!(TokenHash::parse(&TokenHash::of("").to_string()).is_err());
        assert!(TokenHash::parse("sha256:zz").is_err());
    }

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn tokens_reach_only_their_app() {
        let gate = Gate::new(
            AuthConfig {
                admin: vec![TokenHash::of("root")],
                apps: vec![("a".into(), TokenHash::of("ta"))],
                connection_info_needs_token: false,
            },
            RateLimitConfig::default(),
            None,
        );
        let code = |r: Result<(), Error>| match r {
            Ok(()) => "ok",
            Err(Error::Unauthenticated(_)) => "unauthenticated",
            Err(Error::PermissionDenied(_)) => "denied",
            Err(_) => "other",
        };
        assert_eq!(code(gate.admit(Access::Manage, &md("root"), "b")), "ok");
        assert_eq!(code(gate.admit(Access::Manage, &md("ta"), "a")), "ok");
        assert_eq!(code(gate.admit(Access::Manage, &md("ta"), "b")), "denied");
        assert_eq!(
            code(gate.admit(Access::Manage, &md("x"), "a")),
            "unauthenticated"
        );
        let none = MetadataMap::new();
        assert_eq!(
            code(gate.admit(Access::Manage, &none, "a")),
            "unauthenticated"
        );
        assert_eq!(
            code(gate.admit(Access::Manage, &md(""), "a")),
            "unauthenticated"
        );
        assert_eq!(code(gate.admit(Access::ConnectionInfo, &none, "a")), "ok");
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_a_retry_time() {
        let gate = Gate::new(
            AuthConfig::default(),
            RateLimitConfig {
                default: Some(Rate {
                    per_second: 1.0,
                    burst: 3,
                }),
                apps: HashMap::new(),
            },
            None,
        );
        let none = MetadataMap::new();
        for _ in 0..3 {
            gate.admit(Access::Manage, &none, "a").unwrap();
        }
        match gate.admit(Access::Manage, &none, "a") {
            Err(Error::ResourceExhausted { retry_after, .. }) => {
                assert!(retry_after > Duration::from_millis(900), "{retry_after:?}")
            }
            other => panic!("{other:?}"),
        }
        gate.admit(Access::Manage, &none, "b").unwrap();
    }

    #[test]
    fn anonymous_connection_info_calls_have_a_bucket_of_their_own() {
        let gate = Gate::new(
            AuthConfig {
                admin: vec![TokenHash::of("root")],
                apps: vec![],
                connection_info_needs_token: false,
            },
            RateLimitConfig {
                default: Some(Rate {
                    per_second: 0.001,
                    burst: 2,
                }),
                apps: HashMap::new(),
            },
            None,
        );
        let none = MetadataMap::new();
        for _ in 0..2 {
            gate.admit(Access::ConnectionInfo, &none, "a").unwrap();
        }
        assert!(gate.admit(Access::ConnectionInfo, &none, "a").is_err());
        // The app's own callers still have their whole burst.
        for _ in 0..2 {
            gate.admit(Access::Manage, &md("root"), "a").unwrap();
        }
        assert!(gate.admit(Access::Manage, &md("root"), "a").is_err());
    }
}
