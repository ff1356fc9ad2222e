//! Connecting to a roomsched server, shared by the CLI and `roomsched bench`: the address,
//! TLS with a CA file, and the bearer token sent with every call.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Request, Status};

/// A connection to a server whose calls carry the configured credentials.
pub type Conn = InterceptedService<Channel, Credentials>;

/// Adds `authorization: Bearer <token>` to every call, when a token is set.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl Credentials {
    pub fn bearer(token: Option<&str>) -> Result<Credentials, ConnectError> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ConnectError::Setup("the token must be printable ASCII".into()))
            })
            .transpose()
            .map(Credentials)
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach roomsched at {addr}: {}", causes(.source))]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// Where a server is and how to talk to it.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `http://host:port`, `https://host:port` or `host:port` (https when a CA file is given).
    pub addr: String,
    /// PEM file of the CA that signed the server's certificate (TLS).
    pub ca_file: Option<PathBuf>,
    /// Bearer token for servers that require one.
    pub token: Option<String>,
}

impl Target {
    /// Opens one HTTP/2 connection.
    pub async fn connect(&self) -> Result<Conn, ConnectError> {
        let uri = match (self.addr.contains("://"), &self.ca_file) {
            (true, _) => self.addr.clone(),
            (false, None) => format!("http://{}", self.addr),
            (false, Some(_)) => format!("https://{}", self.addr),
        };
        let mut endpoint = Channel::from_shared(uri.clone())
            .map_err(|e| ConnectError::Setup(format!("bad --addr {:?}: {e}", self.addr)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        match (&self.ca_file, uri.starts_with("https://")) {
            (Some(ca), true) => {
                let tls = ClientTlsConfig::new().ca_certificate(read_ca(ca)?);
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| ConnectError::Setup(format!("TLS: {e}")))?;
            }
            (Some(_), false) => {
                return Err(ConnectError::Setup(format!(
                    "--ca-file is for TLS; use an https:// address, not {uri}"
                )))
            }
            (None, true) => return Err(ConnectError::Setup(
                "an https:// address needs --ca-file (the CA that signed the server's certificate)"
                    .into(),
            )),
            (None, false) => {}
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ConnectError::Connect { addr: uri, source })?;
        Ok(InterceptedService::new(
            channel,
            Credentials::bearer(self.token.as_deref())?,
        ))
    }
}

/// An error and its causes, e.g. "transport error: invalid peer certificate: UnknownIssuer"
/// (tonic's transport error alone says only "transport error").
fn causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

fn read_ca(path: &Path) -> Result<Certificate, ConnectError> {
    std::fs::read(path)
        .map(Certificate::from_pem)
        .map_err(|e| ConnectError::Setup(format!("--ca-file {}: {e}", path.display())))
}
