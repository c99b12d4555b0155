//! A worker cell: joins the `billing` service and handles invoice events.
//!
//! Every `billing` cell listens anycatch, so each invoice is handled by
//! exactly one of them; the event is acked when the handler drops it, and
//! redelivered to another cell if this one dies first.
//!
//! ```text
//! cargo run -p thynapse-examples --example worker -- tcp://127.0.0.1:5454
//! ```

use thynapse_cell::{Client, Mode, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:5454".to_owned());
    let client = Client::connect(
        &endpoint,
        Options::new("billing").metadata("version", "1.0.0"),
    )
    .await?;
    println!("worker {} joined {endpoint}", client.id());
    let mut invoices = client.listen("billing::invoice::*", Mode::Any).await?;
    while let Some(event) = invoices.next_event().await {
        println!(
            "{} {} (attempt {}): {}",
            event.id(),
            event.channel(),
            event.attempt(),
            event.payload_value()
        );
    }
    Ok(())
}
