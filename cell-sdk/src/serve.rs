//! The responder's side of request/reply: [`ServeBuilder`], the running
//! [`Responder`], and the [`Request`]s its handler answers.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use serde::Serialize;
use thynapse_protocol::Thid;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::client::Client;
use crate::consts::DEFAULT_SERVE_CONCURRENCY;
use crate::error::Error;
use crate::event::{delivery_accessors, Delivered};
use crate::link::{Control, Dispatch, Link, Sink};
use crate::options::ListenOptions;
use crate::wire;

/// A request for this cell to answer, as a [`Client::serve`] handler gets
/// it.
pub struct Request {
    /// What was delivered: `from` is the requesting cell.
    pub(crate) delivered: Delivered,
    /// Answers the request exactly once; taken by the responder's loop
    /// before the handler gets the request.
    pub(crate) guard: Option<RequestGuard>,
}

impl Request {
    delivery_accessors!("request");
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

/// What [`Client::serve`] calls for each request: any `Fn(Request) -> Fut`
/// (an `async fn`, a closure returning an `async` block) whose future
/// resolves to `Result<T, E>`, `T` the reply's payload (serialized as
/// JSON) and `E` an error whose text becomes the reply's error. It is
/// implemented for every such function; there is no need to implement it.
pub trait Handler: Send + Sync + 'static {
    /// The reply's payload.
    type Output: Serialize + 'static;
    /// The handler's error; its `Display` text goes back to the requester.
    type Error: fmt::Display + 'static;
    /// The handler's future.
    type Future: Future<Output = Result<Self::Output, Self::Error>> + Send + 'static;

    /// Starts handling one request.
    fn call(&self, request: Request) -> Self::Future;
}

impl<F, Fut, T, E> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Serialize + 'static,
    E: fmt::Display + 'static,
{
    type Output = T;
    type Error = E;
    type Future = Fut;

    fn call(&self, request: Request) -> Fut {
        self(request)
    }
}

/// Sends the `RPLY` of one request, or, if it is dropped unanswered (the
/// request was never handed to a handler), its `NACK`, so that the
/// transmitter gives it to another responder.
pub(crate) struct RequestGuard {
    /// The request.
    id: Thid,
    /// Where replies go.
    link: Arc<Link>,
    /// Whether the RPLY was sent.
    answered: bool,
}

impl RequestGuard {
    /// A guard for request `id`.
    pub(crate) fn new(id: Thid, link: Arc<Link>) -> RequestGuard {
        RequestGuard {
            id,
            link,
            answered: false,
        }
    }

    /// Sends the reply.
    fn reply(mut self, frames: Vec<Vec<u8>>) {
        self.answered = true;
        // If the connection is closed the requester times out anyway.
        self.link.control(Control::Reply {
            id: self.id,
            frames,
        });
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.answered {
            self.link.control(Control::Nack(self.id));
        }
    }
}

/// Stops listening when dropped.
struct ListenGuard {
    /// The subscription's id.
    sub: u64,
    /// To the connection task.
    link: Arc<Link>,
}

impl Drop for ListenGuard {
    fn drop(&mut self) {
        self.link.control(Control::Unlisten { sub: self.sub });
    }
}

/// A responder being set up, from [`Client::serve`]: `.await` it (or call
/// [`ServeBuilder::start`]) to start serving.
#[must_use = "nothing is served until the builder is awaited"]
pub struct ServeBuilder<F> {
    /// Listens and replies.
    client: Client,
    /// The channel pattern served.
    pattern: String,
    /// Answers each request.
    handler: F,
    /// Handlers at once.
    concurrency: u32,
}

impl<F> fmt::Debug for ServeBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeBuilder")
            .field("pattern", &self.pattern)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<F: Handler> ServeBuilder<F> {
    pub(crate) fn new(client: Client, pattern: &str, handler: F) -> ServeBuilder<F> {
        ServeBuilder {
            client,
            pattern: pattern.to_owned(),
            handler,
            concurrency: DEFAULT_SERVE_CONCURRENCY,
        }
    }

    /// Runs at most `n` handlers at once (default
    /// [`DEFAULT_SERVE_CONCURRENCY`]; at least 1). It is also the listen's
    /// `concurrency`: the transmitter sends this cell at most `n`
    /// unanswered requests of the pattern and keeps the others, for
    /// whichever responder frees a slot first.
    pub fn concurrency(mut self, n: u32) -> ServeBuilder<F> {
        self.concurrency = n.max(1);
        self
    }

    /// Listens to the pattern (anycatch, with `concurrency`) and starts
    /// answering requests on a tokio task.
    ///
    /// Requests never reach this client's event
    /// [`Subscription`](crate::Subscription)s, nor events its responders:
    /// an event published on a served pattern that no subscription of
    /// this client listens to is acked and dropped.
    ///
    /// # Errors
    /// - [`ErrorKind::InvalidPattern`](crate::ErrorKind::InvalidPattern).
    /// - [`ErrorKind::Conflict`](crate::ErrorKind::Conflict): this client
    ///   already listens to the same pattern with other options (a
    ///   subscription, or a responder of another concurrency).
    /// - [`ErrorKind::Rejected`](crate::ErrorKind::Rejected),
    ///   [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut),
    ///   [`ErrorKind::Disconnected`](crate::ErrorKind::Disconnected).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(self) -> Result<Responder, Error> {
        let ServeBuilder {
            client,
            pattern,
            handler,
            concurrency,
        } = self;
        let options = ListenOptions::any().concurrency(concurrency);
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(concurrency as usize));
        let max_frame = client.limits().max_frame;
        // The connection task starts a handler itself while a slot is free
        // (one task wake-up fewer per request than going through the
        // loop); the loop takes what waits for a slot.
        let start = {
            let (handler, slots) = (handler.clone(), slots.clone());
            move |request| match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    answer_inline(answer(request, permit, handler.clone(), max_frame));
                    None
                }
                Err(_) => Some(request),
            }
        };
        let (listen, requests) = client
            .add_listen(&pattern, options, |sub, _, link| {
                let (queue, rx) = mpsc::unbounded_channel();
                let dispatch = Dispatch {
                    start: Box::new(start),
                    queue,
                };
                (Sink::Requests(dispatch), (ListenGuard { sub, link }, rx))
            })
            .await?;
        let (stop, stopped) = oneshot::channel();
        let serving = Serving {
            requests,
            listen,
            handler,
            slots,
            concurrency,
            max_frame,
        };
        tokio::spawn(serving.run(stopped));
        Ok(Responder {
            pattern,
            concurrency,
            stop: Some(stop),
        })
    }
}

impl<F: Handler> IntoFuture for ServeBuilder<F> {
    type Output = Result<Responder, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Responder, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

/// A running responder, from [`Client::serve`]. Dropping it stops serving
/// (handlers already running finish and reply); [`Responder::stop`] also
/// waits for them.
///
/// When it stops, the cell stops listening to the pattern (`UNLS`), and
/// the requests it holds that no handler started on are handed back to
/// the transmitter (`NACK`), which gives them to another responder.
pub struct Responder {
    /// The pattern served.
    pattern: String,
    /// Handlers at once.
    concurrency: u32,
    /// Tells the loop to stop; its message is told when the running
    /// handlers are done.
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl Responder {
    /// The pattern served.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// How many handlers run at once.
    pub fn concurrency(&self) -> u32 {
        self.concurrency
    }

    /// Stops serving and waits until every running handler has replied.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let (done, finished) = oneshot::channel();
            if stop.send(done).is_ok() {
                // An error means the loop ended already (connection closed).
                let _ = finished.await;
            }
        }
    }
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("pattern", &self.pattern)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// The loop of one responder.
struct Serving<F> {
    /// Requests the connection task routes to this responder.
    requests: mpsc::UnboundedReceiver<Request>,
    /// Unlistens when the loop ends.
    listen: ListenGuard,
    /// Answers each request.
    handler: Arc<F>,
    /// One permit per handler that may run.
    slots: Arc<Semaphore>,
    /// The number of permits.
    concurrency: u32,
    /// The transmitter's largest frame: a larger reply becomes an error.
    max_frame: usize,
}

impl<F: Handler> Serving<F> {
    /// Takes each request that waits for a slot, and starts a handler on
    /// it once one is free, until told to stop, the responder is dropped
    /// or the connection closes.
    async fn run(mut self, mut stop: oneshot::Receiver<oneshot::Sender<()>>) {
        // A request taken but not started when the loop ends: handed back.
        let mut held = None;
        let done = loop {
            let request = tokio::select! {
                biased;
                told = &mut stop => break told.ok(),
                request = self.requests.recv() => match request {
                    Some(request) => request,
                    None => break None,
                },
            };
            let permit = tokio::select! {
                biased;
                told = &mut stop => {
                    held = Some(request);
                    break told.ok();
                }
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => {
                        held = Some(request);
                        break None;
                    }
                },
            };
            tokio::spawn(answer(
                request,
                permit,
                self.handler.clone(),
                self.max_frame,
            ));
        };
        let Serving {
            requests,
            listen,
            slots,
            concurrency,
            ..
        } = self;
        // UNLS before the NACKs of the requests no handler started on, so
        // that the transmitter does not hand them straight back to this
        // cell.
        drop(listen);
        drop(held);
        drop(requests);
        if let Some(done) = done {
            // Every permit back: the running handlers have replied.
            let _ = slots.acquire_many(concurrency).await;
            let _ = done.send(());
        }
    }
}

/// Polls `answering` once where it is, on the connection's task: a
/// handler that answers without waiting then replies without a task of its
/// own, and the replies to one read go out together. What has to wait
/// goes on as a task.
fn answer_inline(answering: impl Future<Output = ()> + Send + 'static) {
    let mut answering = Box::pin(answering);
    // The task polls it again at once, with its own waker: nothing waits
    // on the no-op one.
    let mut cx = Context::from_waker(Waker::noop());
    if answering.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(answering);
    }
}

/// Runs the handler on one request and sends its reply; the permit is
/// held until then.
async fn answer<F: Handler>(
    mut request: Request,
    permit: OwnedSemaphorePermit,
    handler: Arc<F>,
    max_frame: usize,
) {
    let Some(guard) = request.guard.take() else {
        return;
    };
    let id = request.delivered.id;
    // A panicking handler becomes an error reply, whether it panics making
    // its future, polling it or serializing its result: this may run on the
    // connection's task, which a panic must not reach.
    let outcome = match catch_unwind(|| handler.call(request)) {
        Ok(work) => CatchUnwind(std::pin::pin!(work)).await,
        Err(panic) => Err(panic),
    };
    let mut frame = match outcome {
        Ok(Ok(value)) => match catch_unwind(|| serde_json::value::to_raw_value(&value)) {
            Ok(Ok(raw)) => wire::reply(id, &raw),
            Ok(Err(e)) => {
                wire::reply_error(id, &format!("the handler's result does not serialize: {e}"))
            }
            Err(panic) => wire::reply_error(
                id,
                &format!("the handler's result does not serialize: it panicked: {panic}"),
            ),
        },
        Ok(Err(e)) => wire::reply_error(id, &e.to_string()),
        Err(panic) => wire::reply_error(id, &format!("the handler failed: it panicked: {panic}")),
    };
    if frame.len() > max_frame {
        let message = format!(
            "the reply of {} bytes exceeds the transmitter's limit of {max_frame}",
            frame.len()
        );
        frame = wire::reply_error(id, &message);
    }
    guard.reply(vec![frame]);
    drop(permit);
}

/// A future that turns a panic while polling the one it wraps into an
/// error carrying the panic's message (the handler runs on the answering
/// task itself, not on a task of its own).
struct CatchUnwind<'a, F>(Pin<&'a mut F>);

impl<F: Future> Future for CatchUnwind<'_, F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match catch_unwind(|| inner.poll(cx)) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Runs `f`, turning a panic into its message.
fn catch_unwind<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|m| (*m).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}
