//! A TCP pass-through proxy on 127.0.0.1 port 0 that cuts every connection
//! through it on demand: the client and the server both see the connection
//! drop at whatever point their conversation had reached (mid-literal of a
//! FETCH, during IDLE, after DATA). TLS passes through untouched, so the
//! client still verifies the real server's certificate. It can also go
//! silent: a black-holed host, that takes every connection and never says a
//! word.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

pub struct CuttingProxy {
    pub port: u16,
    live: Arc<Mutex<Vec<AbortHandle>>>,
    cut: AtomicUsize,
    silent: Arc<AtomicBool>,
    /// Connections taken while silent.
    held: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

impl CuttingProxy {
    pub async fn start(upstream_port: u16) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cutting proxy: bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("cutting proxy: address")
            .port();
        let live: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let silent: Arc<AtomicBool> = Arc::default();
        let held: Arc<AtomicUsize> = Arc::default();
        let accept = {
            let live = live.clone();
            let (silent, held) = (silent.clone(), held.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let silent = silent.load(Ordering::SeqCst);
                    if silent {
                        held.fetch_add(1, Ordering::SeqCst);
                    }
                    let task = tokio::spawn(async move {
                        if silent {
                            // Reads what the client says, answers nothing.
                            let mut sink = tokio::io::sink();
                            let _ = tokio::io::copy(&mut client, &mut sink).await;
                            return;
                        }
                        let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                    let mut live = live.lock().unwrap();
                    live.retain(|handle| !handle.is_finished());
                    live.push(task.abort_handle());
                }
            })
        };
        CuttingProxy {
            port,
            live,
            cut: AtomicUsize::new(0),
            silent,
            held,
            accept,
        }
    }

    /// `{"host", "port", "security": "tls"}` for a connect request.
    pub fn tls_endpoint(&self) -> serde_json::Value {
        serde_json::json!({"host": "127.0.0.1", "port": self.port, "security": "tls"})
    }

    /// Drops every open connection; returns how many.
    pub fn cut_all(&self) -> usize {
        let handles: Vec<AbortHandle> = std::mem::take(&mut *self.live.lock().unwrap());
        let open = handles.iter().filter(|h| !h.is_finished()).count();
        for handle in handles {
            handle.abort();
        }
        self.cut.fetch_add(open, Ordering::SeqCst);
        open
    }

    /// From now on a black hole: the open connections are cut, and every
    /// new one is taken and never answered.
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
        self.cut_all();
    }

    /// Connections taken (and never answered) since it went silent.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }
}
