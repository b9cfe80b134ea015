//! The one upstream every contender forwards to. The first byte of a connection picks its job:
//! `B` bulk (then two u64: bytes to read, bytes to write), `R` request/response (fixed-size
//! requests answered with fixed-size responses until EOF), `S` source (writes until the client
//! goes away).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes of one request in `R` mode.
pub const REQUEST: usize = 100;
/// Bytes of one response in `R` mode.
pub const RESPONSE: usize = 200;
/// Size of the writes in `B` and `S` modes.
const BLOCK: usize = 64 * 1024;

/// Starts the upstream on 127.0.0.1; returns its address.
pub async fn start() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(sock).await;
                    });
                }
                // Out of descriptors: keep the listener, try again shortly.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    });
    Ok(addr)
}

async fn serve(mut sock: TcpStream) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    sock.read_exact(&mut mode).await?;
    match mode[0] {
        b'B' => {
            let mut header = [0u8; 16];
            sock.read_exact(&mut header).await?;
            let up = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let down = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
            let (mut rd, mut wr) = sock.split();
            let read = async {
                let mut buf = vec![0u8; 256 * 1024];
                let mut left = up;
                while left > 0 {
                    let n = rd.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    left = left.saturating_sub(n as u64);
                }
                Ok::<_, std::io::Error>(())
            };
            let write = async {
                let block = vec![0x5au8; BLOCK];
                let mut left = down;
                while left > 0 {
                    let n = (left as usize).min(BLOCK);
                    wr.write_all(&block[..n]).await?;
                    left -= n as u64;
                }
                Ok::<_, std::io::Error>(())
            };
            tokio::try_join!(read, write)?;
            // One byte acknowledges that everything sent up has arrived.
            wr.write_all(b"!").await?;
            wr.shutdown().await
        }
        b'R' => {
            let mut req = [0u8; REQUEST];
            let resp = [0x42u8; RESPONSE];
            loop {
                if sock.read_exact(&mut req).await.is_err() {
                    return Ok(());
                }
                sock.write_all(&resp).await?;
            }
        }
        b'S' => {
            let block = vec![0x33u8; BLOCK];
            loop {
                sock.write_all(&block).await?;
            }
        }
        _ => Ok(()),
    }
}
