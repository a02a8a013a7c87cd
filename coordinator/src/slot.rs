//! A shared, replaceable reference to a singleton actor. When a supervisor restarts one of
//! its children it stores the new reference here, and every holder of the slot sends to the
//! new actor from then on.

use std::sync::{Arc, RwLock};

use ractor::{ActorRef, Message};

pub struct Slot<M: Message>(Arc<RwLock<ActorRef<M>>>);

impl<M: Message> Clone for Slot<M> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<M: Message> std::fmt::Debug for Slot<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({:?})", self.get().get_id())
    }
}

impl<M: Message> Slot<M> {
    pub fn new(actor: ActorRef<M>) -> Self {
        Self(Arc::new(RwLock::new(actor)))
    }

    pub fn get(&self) -> ActorRef<M> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, actor: ActorRef<M>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = actor;
    }

    /// Sends without waiting. A message to an actor that is gone is dropped and logged:
    /// its supervisor is restarting it and recovery re-sends what matters.
    pub fn cast(&self, msg: M) {
        let actor = self.get();
        if actor.cast(msg).is_err() {
            tracing::warn!(actor = ?actor.get_name(), "message to a stopped actor dropped");
        }
    }
}
