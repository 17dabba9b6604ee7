//! `ferry echo`: answers every TCP line, HTTP request and UDP datagram with its
//! name, so a client learns which backend answered (like Kubernetes' agnhost).
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream, UdpSocket},
};

use crate::EchoArgs;

pub async fn run(args: EchoArgs) -> Result<()> {
    let name = args
        .name
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "echo".into());
    if args.tcp.is_empty() && args.udp.is_empty() {
        bail!("nothing to serve: give --tcp PORT and/or --udp PORT");
    }
    let name: Arc<str> = name.into();
    let mut tasks = tokio::task::JoinSet::new();
    for port in args.tcp {
        let l = TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("tcp port {port}"))?;
        let name = name.clone();
        tasks.spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else { continue };
                tokio::spawn(serve_tcp(s, peer, name.clone()));
            }
        });
    }
    for port in args.udp {
        let s = UdpSocket::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("udp port {port}"))?;
        let reply = format!("{name}\n");
        let name = name.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                if let Ok((n, peer)) = s.recv_from(&mut buf).await {
                    // "peer": who does the server see? (source NAT checks)
                    let answer = if buf[..n].trim_ascii() == b"peer" {
                        format!("{name} {peer}\n")
                    } else {
                        reply.clone()
                    };
                    let _ = s.send_to(answer.as_bytes(), peer).await;
                }
            }
        });
    }
    tracing::info!(%name, "echo server listening");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

const HTTP_METHODS: &[&str] = &["GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH "];

async fn serve_tcp(s: TcpStream, peer: std::net::SocketAddr, name: Arc<str>) {
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut first = true;
    while let Ok(Some(line)) = lines.next_line().await {
        if first && HTTP_METHODS.iter().any(|m| line.starts_with(m)) {
            // Drain the headers, answer once, close.
            while let Ok(Some(h)) = lines.next_line().await {
                if h.trim().is_empty() {
                    break;
                }
            }
            let body = format!("{name}\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = w.write_all(resp.as_bytes()).await;
            return;
        }
        first = false;
        // "peer": the name and the address the server sees the client at.
        let answer = if line.trim() == "peer" {
            format!("{name} {peer}\n")
        } else {
            format!("{name}\n")
        };
        if w.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}
