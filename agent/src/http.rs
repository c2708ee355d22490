//! The agent's port: `/readyz` (200 only while the entry is in place, else 503 and why),
//! `/healthz`, and `/metrics`. A minimal HTTP/1.1 responder: probes and Prometheus send
//! one GET per connection, and nothing else is served.

use crate::error::ServeError;
use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The response for a request line's path: status and body.
pub fn respond(path: &str, metrics: &Metrics) -> (u16, String) {
    match path {
        "/readyz" => match metrics.readiness() {
            Ok(()) => (200, "ok\n".into()),
            Err(reason) => (503, format!("not ready: {reason}\n")),
        },
        "/healthz" => (200, "ok\n".into()),
        "/metrics" => (200, metrics.render()),
        _ => (404, "not found\n".into()),
    }
}

pub async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError {
        addr: addr.to_owned(),
        source,
    })
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(err) = handle(stream, &metrics).await {
                        tracing::debug!(%err, "metrics connection");
                    }
                });
            }
            Err(err) => tracing::warn!(%err, "accepting a metrics connection"),
        }
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // The request line is all we need; headers are read up to the buffer's size and dropped.
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            len += n;
            if n == 0 || buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                return Ok::<_, std::io::Error>(());
            }
        }
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("/");
    let (status, body) = respond(path, metrics);
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let content_type = if path == "/metrics" {
        "text/plain; version=0.0.4"
    } else {
        "text/plain"
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_follows_readiness() {
        let m = Metrics::default();
        assert_eq!(respond("/readyz", &m).0, 503);
        m.set_readiness(Ok(()));
        assert_eq!(respond("/readyz", &m), (200, "ok\n".into()));
        m.set_readiness(Err("10-node.conflist has no meshinit-cni entry".into()));
        let (status, body) = respond("/readyz", &m);
        assert_eq!(status, 503);
        assert!(body.contains("10-node.conflist"), "{body}");
        assert_eq!(respond("/nope", &m).0, 404);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::default());
        metrics.set_readiness(Ok(()));
        tokio::spawn(serve(listener, metrics));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("meshinit_cni_ready 1\n"), "{response}");
    }
}
