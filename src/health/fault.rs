//! How an actor's run ends, and the fault port through which a test makes it end. Every
//! actor's loop speaks these types (Felix and confd act a fault out inside their own
//! loop), so they sit with health reporting below every actor; the supervisor that
//! spawns and watches the actors is daemon wiring (`node::supervisor`).

use tokio::sync::mpsc;

/// What an actor's run ended with: `Ok` when it returned by itself, `Err` with its error.
pub type ActorResult = Result<(), String>;

/// A failure a test injects into a supervised actor.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The actor returns this error.
    Fail(String),
    /// The actor panics with this message.
    Panic(String),
}

impl Fault {
    /// Act the fault out where it is received: the error to end with, or a panic here.
    pub fn strike(self) -> String {
        match self {
            Fault::Fail(why) => why,
            Fault::Panic(msg) => panic!("{msg}"),
        }
    }
}

/// A test's fault input into an actor's own loop; `None` in production.
pub type FaultInput = Option<mpsc::Receiver<Fault>>;

/// The next fault on `input`; never, without one (or once its sender is gone).
pub async fn next_fault(input: &mut FaultInput) -> Fault {
    match input {
        Some(rx) => match rx.recv().await {
            Some(f) => f,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
