//! Publishing task events to containerd (`/tasks/create`, `/tasks/exit`, ...).

use std::sync::Mutex;

use containerd_shim::event::Event;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;

/// Sends events to containerd for one namespace. A failed publish is logged, never fatal:
/// containerd also learns the state from the Task API.
pub struct Events {
    publisher: Option<Mutex<RemotePublisher>>,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Events {
            publisher: Some(Mutex::new(publisher)),
            namespace: namespace.to_string(),
        }
    }

    /// Events that go nowhere (the `delete` action has no publisher).
    pub fn none(namespace: &str) -> Self {
        Events {
            publisher: None,
            namespace: namespace.to_string(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn publish<E: Event + 'static>(&self, event: E) {
        let Some(publisher) = &self.publisher else {
            return;
        };
        let topic = event.topic();
        let publisher = publisher.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) =
            publisher.publish(Context::default(), &topic, &self.namespace, Box::new(event))
        {
            log::warn!("publishing {topic} failed: {e}");
        }
    }
}
