//! [`Discover`]: questions about the mesh (`DISC`).

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;

use serde_json::Value;

use crate::client::Client;
use crate::error::Error;
use crate::wire::{self, DiscoverBody};

/// A question about the mesh, from [`Client::discover`]: `.await` it (or
/// call [`Discover::ask`]) for the transmitter's JSON answer.
///
/// | `what` | answer |
/// | --- | --- |
/// | `services` | `[{"service", "instances", "versions"}]` |
/// | `instances` | `[{"id", "service", "metadata", "transmitter", "listens"}]` |
/// | `hosts`, `regions` | `[{"host"/"region", "instances", "services"}]` |
/// | `versions` | `[{"service", "version", "instances"}]` |
/// | `topology` | region → host → service → cell THIDs |
#[must_use = "nothing is asked until the builder is awaited"]
pub struct Discover {
    /// Asks.
    client: Client,
    /// The question.
    what: String,
    /// Only cells of this service.
    service: Option<String>,
    /// Only cells whose metadata matches.
    query: Option<Value>,
}

impl fmt::Debug for Discover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discover")
            .field("what", &self.what)
            .field("service", &self.service)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

impl Discover {
    pub(crate) fn new(client: Client, what: &str) -> Discover {
        Discover {
            client,
            what: what.to_owned(),
            service: None,
            query: None,
        }
    }

    /// Counts only cells of `service`.
    pub fn service(mut self, service: impl Into<String>) -> Discover {
        self.service = Some(service.into());
        self
    }

    /// Counts only cells whose metadata matches `query` (a selector string
    /// or a JSON query).
    pub fn matching(mut self, query: impl Into<Value>) -> Discover {
        self.query = Some(query.into());
        self
    }

    /// Asks, and returns the answer (the `OKAY`'s `result`).
    ///
    /// # Errors
    /// [`ErrorKind::BadQuery`](crate::ErrorKind::BadQuery),
    /// [`ErrorKind::Rejected`](crate::ErrorKind::Rejected) (an unknown
    /// `what`), [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut),
    /// [`ErrorKind::Disconnected`](crate::ErrorKind::Disconnected).
    pub async fn ask(self) -> Result<Value, Error> {
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            result: Value,
        }
        let reference = self.client.next_ref();
        let frame = wire::discover(&DiscoverBody {
            what: &self.what,
            service: self.service.as_deref(),
            query: self.query.as_ref(),
            reference,
        });
        let body = self
            .client
            .call(reference, vec![frame], None, "DISC")
            .await?;
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|e| Error::deserialize("the OKAY to DISC", e))?;
        Ok(answer.result)
    }
}

impl IntoFuture for Discover {
    type Output = Result<Value, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.ask())
    }
}
