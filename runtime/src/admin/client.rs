//! The client side of the admin endpoint, for commands such as
//! `meshlite-control-plane status`: one HTTP/1.1 GET over hyper, bounded in time.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// A failed admin request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr}: connect: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}{path}: {source}")]
    Http {
        addr: String,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr}{path}: invalid request: {source}")]
    Request {
        addr: String,
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("{addr}{path}: no answer within {timeout:?}")]
    Timeout {
        addr: String,
        path: String,
        timeout: Duration,
    },
    #[error("{addr}{path}: HTTP {status}: {body}")]
    Status {
        addr: String,
        path: String,
        status: u16,
        body: String,
    },
}

/// GETs `path` from the admin endpoint at `addr` (`host:port`) and returns the body
/// of a 200 answer. The whole exchange must finish within `timeout`.
///
/// # Errors
/// Connection or protocol failures, a timeout, or a status other than 200.
pub async fn get(addr: &str, path: &str, timeout: Duration) -> Result<Bytes, ClientError> {
    match tokio::time::timeout(timeout, exchange(addr, path)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout {
            addr: addr.to_string(),
            path: path.to_string(),
            timeout,
        }),
    }
}

async fn exchange(addr: &str, path: &str) -> Result<Bytes, ClientError> {
    let http = |source| ClientError::Http {
        addr: addr.to_string(),
        path: path.to_string(),
        source,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection is driven until the response is read, then dropped with it.
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            addr: addr.to_string(),
            path: path.to_string(),
            source,
        })?;
    let res = sender.send_request(req).await.map_err(http)?;
    let status = res.status();
    let body = res.into_body().collect().await.map_err(http)?.to_bytes();
    conn.abort();
    if status != hyper::StatusCode::OK {
        return Err(ClientError::Status {
            addr: addr.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gets_a_body_and_reports_status_refusal_and_silence() {
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "hello" }))
            .route(
                "/missing",
                axum::routing::get(|| async {
                    (axum::http::StatusCode::NOT_FOUND, "no such thing")
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let t = Duration::from_secs(5);
        assert_eq!(get(&addr, "/ok", t).await.unwrap(), "hello");
        let e = get(&addr, "/missing", t).await.unwrap_err();
        assert!(matches!(e, ClientError::Status { status: 404, .. }), "{e}");
        assert!(e.to_string().contains("no such thing"), "{e}");

        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert!(matches!(
            get(&closed, "/ok", t).await,
            Err(ClientError::Connect { .. })
        ));

        // A server that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap().to_string();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let e = get(&silent_addr, "/ok", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    }
}
