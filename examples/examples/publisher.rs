//! A publisher cell: sends a few invoice events and asks for a confirm on
//! the last one, so it learns how many services it reached (or that no cell
//! listens).
//!
//! ```text
//! cargo run -p thynapse-examples --example publisher -- tcp://127.0.0.1:5454
//! ```

use serde_json::json;
use thynapse_cell::{Client, ErrorKind, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:5454".to_owned());
    let client = Client::connect(&endpoint, Options::new("shop")).await?;
    for n in 1..=5 {
        let id = client
            .publish(
                "billing::invoice::paid",
                json!({"invoice": n, "amount": 10 * n}),
            )
            .await?;
        println!("published invoice {n} as {id}");
    }
    match client
        .publish_confirmed(
            "billing::invoice::paid",
            json!({"invoice": 6, "amount": 60}),
        )
        .await
    {
        Ok(confirm) => println!("invoice 6 routed to {} place(s)", confirm.routed),
        Err(e) if e.kind() == ErrorKind::NoListeners => println!("no billing cell is listening"),
        Err(e) => return Err(e.into()),
    }
    client.close().await;
    Ok(())
}
