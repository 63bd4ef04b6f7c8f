//! A small HTTP/1.1 client (hyper) for the rollback webhook and the Prometheus API: one
//! request per connection, `http://` or `https://` (certificate and host name verified against
//! the system's trust store), an overall timeout, and a bounded answer.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Largest answer read (a Prometheus answer to one of our queries is a few KiB).
pub const MAX_BODY: usize = 4 << 20;

/// A parsed `http(s)://host[:port][/path]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `https`.
    pub tls: bool,
    /// Host name or address (brackets removed from IPv6).
    pub host: String,
    /// Port (80 or 443 by default).
    pub port: u16,
    /// Path and query, `/` at least.
    pub path: String,
}

impl Target {
    /// Parses a URL; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported (use the token option)".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(format!("{url:?}: unclosed [ in the host"));
            };
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?}: {p:?} is not a port"))?,
            None if tls => 443,
            None => 80,
        };
        if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(format!("{url:?}: spaces or control characters in the path"));
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The same server with another path (and query).
    pub fn with_path(&self, path: String) -> Self {
        Self {
            path,
            ..self.clone()
        }
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (false, 80) | (true, 443) => h,
            _ => format!("{h}:{}", self.port),
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, TLS, or the exchange.
    #[error("{0}")]
    Io(String),
}

/// One request; returns the status and the body (at most [`MAX_BODY`]).
pub async fn request(
    target: &Target,
    method: hyper::Method,
    headers: &[(&str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), Error> {
    tokio::time::timeout(timeout, exchange(target, method, headers, body))
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

async fn exchange(
    target: &Target,
    method: hyper::Method,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<(StatusCode, Bytes), Error> {
    let io = |e: &dyn std::fmt::Display| Error::Io(e.to_string());
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| io(&format!("connect {}:{}: {e}", target.host, target.port)))?;
    let _ = tcp.set_nodelay(true);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(&target.path)
        .header(hyper::header::HOST, target.host_header())
        .header(
            hyper::header::USER_AGENT,
            concat!("cync-mitm/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(body)).map_err(|e| io(&e))?;
    if target.tls {
        let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
            .map_err(|e| io(&e))?;
        b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
            .map_err(|e| io(&e))?;
        let ssl = b
            .build()
            .configure()
            .and_then(|c| c.into_ssl(&target.host))
            .map_err(|e| io(&e))?;
        let mut s = tokio_openssl::SslStream::new(ssl, tcp).map_err(|e| io(&e))?;
        std::pin::Pin::new(&mut s)
            .connect()
            .await
            .map_err(|e| io(&format!("TLS with {}: {e}", target.host)))?;
        send(TokioIo::new(s), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
}

async fn send<T>(io: T, req: hyper::Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let e = |e: &dyn std::fmt::Display| Error::Io(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|x| e(&x))?;
    let driver = tokio::spawn(conn);
    let result = async {
        let resp = sender.send_request(req).await.map_err(|x| e(&x))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|x| e(&format!("reading the answer: {x}")))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_says_what_is_wrong() {
        let t = Target::parse("http://127.0.0.1:9090").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 9090, "/")
        );
        let t = Target::parse("https://hooks.example/x/y?z=1").unwrap();
        assert_eq!((t.tls, t.port, t.path.as_str()), (true, 443, "/x/y?z=1"));
        assert_eq!(t.host_header(), "hooks.example");
        let t = Target::parse("http://[::1]:8080/a").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.host_header(), "[::1]:8080");
        for bad in [
            "ftp://x",
            "http://",
            "http://:80",
            "http://h:0",
            "http://h:99999",
            "http://u:p@h/",
            "http://[::1/",
            "http://h/a b",
            "",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn posts_and_reads_the_answer_and_times_out_on_a_silent_server() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"{\"a\":1}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let t = Target::parse(&format!("http://{addr}/hook")).unwrap();
        let (status, body) = request(
            &t,
            hyper::Method::POST,
            &[("authorization", "Bearer x".into())],
            Bytes::from_static(b"{\"a\":1}"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(&body[..], b"ok");
        let req = server.await.unwrap();
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(req.to_ascii_lowercase().contains("authorization: bearer x"));
        // A server that accepts and never answers: the timeout.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let _s = l.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let t = Target::parse(&format!("http://{addr}/")).unwrap();
        let e = request(
            &t,
            hyper::Method::GET,
            &[],
            Bytes::new(),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
    }
}
