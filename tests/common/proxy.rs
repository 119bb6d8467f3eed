//! A TCP proxy a test can cut: while it is down, open connections are
//! closed and new ones are refused (accepted and dropped at once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    /// Start forwarding a loopback port to `upstream`. Needs a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(0u64);
        let accepting = down.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if accepting.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                cut_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self { addr, down, cut }
    }

    /// Cut every connection and refuse new ones until `restore`.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// The address a server URL names (`localhost` as 127.0.0.1), for a proxy
/// in front of it.
pub fn addr_of(url: &str, default_port: u16) -> SocketAddr {
    let u = reqwest::Url::parse(url).unwrap();
    let host = match u.host_str().unwrap() {
        "localhost" => "127.0.0.1",
        h => h,
    };
    format!("{host}:{}", u.port().unwrap_or(default_port))
        .parse()
        .unwrap()
}

/// `url` with the proxy's address in place of the server's.
pub fn through(url: &str, proxy: &Proxy) -> reqwest::Url {
    let mut via = reqwest::Url::parse(url).unwrap();
    via.set_port(Some(proxy.addr.port())).unwrap();
    via.set_host(Some("127.0.0.1")).unwrap();
    via
}
