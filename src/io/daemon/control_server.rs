//! The daemon side of the control socket: one request line in, one answer line out.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::ControlMsg;
use crate::io::control::{self, Reply, Request};

/// Serves one control connection: one request line, one answer line. After `down` the
/// connection stays open until the process exits, so the client sees EOF only when the
/// teardown is complete.
pub(super) async fn serve_control(stream: UnixStream, tx: mpsc::Sender<ControlMsg>) {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read.take(control::MAX_REQUEST as u64));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return;
    }
    let (reply, down) = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            let msg = ControlMsg {
                request,
                reply: reply_tx,
            };
            let reply = if tx.send(msg).await.is_ok() {
                reply_rx
                    .await
                    .unwrap_or_else(|_| refusal("the daemon is going down"))
            } else {
                refusal("the daemon is going down")
            };
            (reply, request == Request::Down)
        }
        Err(e) => (refusal(&format!("bad request: {e}")), false),
    };
    let Ok(mut text) = serde_json::to_string(&reply) else {
        return;
    };
    text.push('\n');
    if write.write_all(text.as_bytes()).await.is_err() {
        return;
    }
    if down {
        std::future::pending::<()>().await;
    }
}

pub(super) fn refusal(error: &str) -> Reply {
    Reply {
        ok: false,
        error: Some(error.into()),
        status: None,
    }
}

/// Creates the run directory (root only) and removes a stale socket of a dead daemon.
pub(super) fn prepare_run_dir(socket_path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(dir) = socket_path.parent() else {
        return Err(format!("bad control socket path {}", socket_path.display()));
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
    Ok(())
}

pub(super) fn bind_control(path: &std::path::Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot create the control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::control::InterfaceStatus;

    async fn client(stream: UnixStream, line: &str) -> (String, tokio::io::BufReader<UnixStream>) {
        let mut reader = tokio::io::BufReader::new(stream);
        reader.get_mut().write_all(line.as_bytes()).await.unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).await.unwrap();
        (answer, reader)
    }

    #[tokio::test]
    async fn control_show_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve_control(b, tx));
        let answer = tokio::spawn(client(a, "{\"cmd\":\"show\"}\n"));
        let msg = rx.recv().await.unwrap();
        assert_eq!(msg.request, Request::Show);
        let status = InterfaceStatus {
            name: "t0".into(),
            ..InterfaceStatus::default()
        };
        msg.reply
            .send(Reply {
                ok: true,
                error: None,
                status: Some(status.clone()),
            })
            .unwrap();
        let (line, _) = answer.await.unwrap();
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(reply.status, Some(status));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn control_rejects_bad_requests() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let server = tokio::spawn(serve_control(b, tx));
        let (line, _) = client(a, "{\"cmd\":\"reboot\"}\n").await;
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert!(!reply.ok);
        assert!(reply.error.unwrap().starts_with("bad request"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn down_holds_the_connection_until_the_daemon_is_gone() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve_control(b, tx));
        let answer = tokio::spawn(client(a, "{\"cmd\":\"down\"}\n"));
        let msg = rx.recv().await.unwrap();
        assert_eq!(msg.request, Request::Down);
        msg.reply
            .send(Reply {
                ok: true,
                ..Reply::default()
            })
            .unwrap();
        let (line, mut reader) = answer.await.unwrap();
        assert!(serde_json::from_str::<Reply>(&line).unwrap().ok);
        // Still open while the "teardown" runs...
        let mut rest = Vec::new();
        let pending =
            tokio::time::timeout(Duration::from_millis(100), reader.read_to_end(&mut rest)).await;
        assert!(
            pending.is_err(),
            "connection closed before the daemon exited"
        );
        // ...and EOF once the daemon (here: the serving task) is gone.
        server.abort();
        let eof = tokio::time::timeout(Duration::from_secs(2), reader.read_to_end(&mut rest)).await;
        assert!(matches!(eof, Ok(Ok(0))));
    }

    #[tokio::test]
    async fn a_daemon_going_down_refuses_requests() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let server = tokio::spawn(serve_control(b, tx));
        let (line, _) = client(a, "{\"cmd\":\"show\"}\n").await;
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(reply.error.as_deref(), Some("the daemon is going down"));
        server.await.unwrap();
    }
}
