//! The lab's one HTTP client: GET from inside a namespace (the agents serve
//! /flows and /metrics on loopback inside their host namespaces, the real
//! guests their status page, Prometheus its API). ureq, plain HTTP, no
//! proxy from the environment: every address is inside our namespaces.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;

use crate::netns;

/// How long to wait for a connection: refused at once by a host whose
/// agent is not up yet; a guest that has not booted answers no ARP.
const CONNECT: Duration = Duration::from_secs(1);
/// How long to wait for the answer's head.
const RESPONSE: Duration = Duration::from_secs(5);
/// How long to wait for the whole body: a million-pair agent's /metrics
/// takes seconds to render on a loaded machine.
const BODY: Duration = Duration::from_secs(10);
/// The largest body read (ureq's default is 10 MB).
const BODY_LIMIT: u64 = 1 << 30;

/// `GET path` from `addr`, asked from inside namespace `ns`; the body of a
/// 200 answer, `None` when nobody answers or the status is not 200. An
/// error only when the namespace cannot be entered.
pub fn get(ns: &str, addr: SocketAddr, path: &str) -> Result<Option<String>> {
    let url = format!("http://{addr}{path}");
    netns::in_netns(ns, move || Ok(get_here(&url)))
}

/// `GET url` from the calling thread's namespace.
fn get_here(url: &str) -> Option<String> {
    let config = ureq::Agent::config_builder()
        .proxy(None)
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT))
        .timeout_recv_response(Some(RESPONSE))
        .timeout_recv_body(Some(BODY))
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let mut answer = agent.get(url).call().ok()?;
    if answer.status() != 200 {
        return None;
    }
    answer
        .body_mut()
        .with_config()
        .limit(BODY_LIMIT)
        .read_to_string()
        .ok()
}

/// Percent-encodes `s` for a URL query value (RFC 3986 unreserved kept).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
    };

    /// One answer from a tiny server on loopback.
    fn serve(answer: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(answer.as_bytes()).unwrap();
        });
        format!("http://{addr}/metrics")
    }

    #[test]
    fn a_200_gives_the_body_anything_else_none() {
        let ok = serve("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
        assert_eq!(get_here(&ok).as_deref(), Some("hello"));
        let missing =
            serve("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        assert_eq!(get_here(&missing), None);
        // Nobody listens on port 9 of loopback.
        assert_eq!(get_here("http://127.0.0.1:9/"), None);
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(url_encode("a_b{c=\"d\"}"), "a_b%7Bc%3D%22d%22%7D");
    }
}
