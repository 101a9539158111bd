//! A loopback HTTP server for download tests (`tiny_http`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Serves `files` (name, bytes) on `127.0.0.1` at a free port until the process ends,
/// answering 404 for other names, and counts the requests in `hits`. Returns the base URL
/// (`http://127.0.0.1:PORT/`).
///
/// # Panics
/// When no loopback port can be bound.
pub fn serve_files(files: Vec<(String, Vec<u8>)>, hits: Arc<AtomicUsize>) -> String {
    #[allow(clippy::expect_used)]
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind a loopback port");
    let base = match server.server_addr().to_ip() {
        Some(addr) => format!("http://{addr}/"),
        None => String::from("http://127.0.0.1/"),
    };
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            hits.fetch_add(1, Ordering::SeqCst);
            let name = req.url().trim_start_matches('/').to_string();
            let _ = match files.iter().find(|(n, _)| *n == name) {
                Some((_, body)) => req.respond(tiny_http::Response::from_data(body.clone())),
                None => req.respond(tiny_http::Response::empty(404)),
            };
        }
    });
    base
}
