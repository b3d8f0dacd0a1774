//! How an `acr` step reaches a run registry on the host's loopback, which a container
//! cannot: the executor listens on the run network's gateway (for that network's
//! containers only) and forwards to the registry; inside the step, the acr image listens
//! on the registry's own address and forwards to the executor's end. Both ends are
//! [`forward`].

use std::net::SocketAddr;

/// The variable acr-cli reads the registry from when `--registry` is not given.
pub const DEFAULT_REGISTRY_ENV: &str = "ACR_DEFAULT_REGISTRY";
/// `LISTEN=TARGET`: relay the registry's address inside a step container.
pub const RELAY_ENV: &str = "ACR_TASK_RELAY";
/// The run's login to its registry, for `acr` commands given no `-u`/`-p`.
pub const USERNAME_ENV: &str = "ACR_TASK_REGISTRY_USERNAME";
pub const PASSWORD_ENV: &str = "ACR_TASK_REGISTRY_PASSWORD";

/// Forwards every connection accepted on `listener` from a peer `allow` admits to
/// `target`, until the listener fails or the task is aborted.
pub async fn forward(
    listener: tokio::net::TcpListener,
    target: Vec<SocketAddr>,
    allow: impl Fn(SocketAddr) -> bool + Send + 'static,
) {
    while let Ok((mut inbound, peer)) = listener.accept().await {
        if !allow(peer) {
            tracing::warn!(%peer, "registry relay: refused a connection from outside the run network");
            continue;
        }
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(&target[..]).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}
