//! A typed RPC service: a `calc` responder that adds two numbers, and a
//! requester that calls it with serde structs on both sides.
//!
//! The responder serves `calc::add` with at most 4 handlers at once; the
//! transmitter holds further requests back and sends them to whichever
//! `calc` cell is least busy. A handler's `Err` reaches the requester as
//! `ErrorKind::Rejected` with its message.
//!
//! ```text
//! cargo run -p thynapse-examples --example rpc -- tcp://127.0.0.1:5454
//! ```

use serde::{Deserialize, Serialize};
use thynapse_cell::{Client, ErrorKind, Options, Request};

/// The request: `a + b`.
#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// The reply.
#[derive(Debug, Serialize, Deserialize)]
struct Sum {
    sum: i64,
}

/// The handler: a serde struct in, a serde struct or an error message out.
async fn add(request: Request) -> anyhow::Result<Sum> {
    let Add { a, b } = request.payload()?;
    let sum = a
        .checked_add(b)
        .ok_or_else(|| anyhow::anyhow!("{a} + {b} overflows"))?;
    Ok(Sum { sum })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:5454".to_owned());

    let server =
        Client::connect(&endpoint, Options::new("calc").metadata("version", "1.0.0")).await?;
    let responder = server.serve("calc::add", add).concurrency(4).await?;
    println!("calc {} serves {}", server.id(), responder.pattern());

    let client = Client::connect(&endpoint, Options::new("rpc-example")).await?;
    let sum: Sum = client
        .request_json("calc::add", &Add { a: 40, b: 2 })
        .await?;
    println!("40 + 2 = {}", sum.sum);

    match client
        .request_json::<_, Sum>("calc::add", &Add { a: i64::MAX, b: 1 })
        .await
    {
        Err(e) if e.kind() == ErrorKind::Rejected => println!("refused: {}", e.message()),
        other => anyhow::bail!("expected the handler's error, got {other:?}"),
    }

    responder.stop().await;
    client.close().await;
    server.close().await;
    Ok(())
}
