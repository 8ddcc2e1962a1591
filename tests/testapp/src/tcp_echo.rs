//! The plain TCP service on `$TCP_PORT`: each connection gets `<hostname>\n`, then every byte it
//! sends back, until it closes its side. It lets tests see which instance a TCP route reached.

use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

/// How long an echo connection may stay silent.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Accepts connections until the listener fails, each echoed on its own thread.
pub fn serve_forever(listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || echo(stream));
            }
            Err(e) => eprintln!("testapp: tcp accept: {e}"),
        }
    }
}

fn echo(mut stream: TcpStream) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_nodelay(true);
    println!("{peer} TCP connected");
    let Ok(mut input) = stream.try_clone() else {
        return;
    };
    // One write, so that the greeting arrives in one piece.
    let greeting = format!("{}\n", crate::hostname());
    let echoed = stream.write_all(greeting.as_bytes()).and_then(|()| io::copy(&mut input, &mut stream));
    let _ = stream.shutdown(Shutdown::Write);
    match echoed {
        Ok(n) => println!("{peer} TCP closed after echoing {n} bytes"),
        Err(e) => println!("{peer} TCP failed: {e}"),
    }
}
