//! One actor per connected node: the coordinator side of its stream. Inbound frames arrive
//! here in order and go to the registry (register, heartbeat, drain) or the dispatcher
//! (results). Outbound frames leave through a bounded channel that the gRPC adapter turns
//! into the response stream.
//! Child of `CoordinatorRoot`.
//!
//! Invariant: a node changes coordinator state only through its session.

use std::time::Duration;

use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{debug, info, warn};

use crate::dispatcher::DispatcherMsg;
use crate::error::call_result;
use crate::node_link::Report;
use crate::registry::RegistryMsg;
use crate::slot::Slot;

const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::node_link::{NodeTx, Outbound};

pub enum NodeSessionMsg {
    Frame(FromNode),
    /// The inbound stream ended or broke.
    Closed(String),
    /// Close the stream (lease expired, replaced, protocol error) with this status.
    Close(tonic::Code, String),
}

pub struct NodeSession;

pub struct NodeSessionArgs {
    pub registry: Slot<RegistryMsg>,
    pub dispatcher: Slot<DispatcherMsg>,
    pub tx: NodeTx,
    pub peer: String,
    /// The namespaces the stream was opened in: those the node serves.
    pub namespaces: Vec<Namespace>,
    /// The client certificate the node presented (DER): then its name must be one the
    /// certificate is for.
    pub certificate: Option<Vec<u8>>,
}

/// Whether a certificate (DER) is for `name` (one of its DNS names).
pub fn certificate_is_for(der: &[u8], name: &str) -> bool {
    let der = rustls_pki_types::CertificateDer::from(der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

pub struct NodeSessionState {
    args: NodeSessionArgs,
    node: Option<(NodeId, u64)>,
    draining: bool,
}

impl NodeSessionState {
    fn close(&mut self, myself: &ActorRef<NodeSessionMsg>, reason: String) {
        self.close_with(myself, tonic::Code::FailedPrecondition, reason);
    }

    fn close_with(&mut self, myself: &ActorRef<NodeSessionMsg>, code: tonic::Code, reason: String) {
        let _ = self.args.tx.try_send(Outbound::Close(code, reason));
        self.disconnect(false);
        myself.stop(None);
    }

    fn disconnect(&mut self, clean: bool) {
        if let Some((node, instance)) = self.node.take() {
            self.args.registry.cast(RegistryMsg::Disconnected {
                node,
                instance,
                clean,
            });
        }
    }
}

impl Actor for NodeSession {
    type Msg = NodeSessionMsg;
    type State = NodeSessionState;
    type Arguments = NodeSessionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: NodeSessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        debug!(peer = %args.peer, "node stream opened");
        Ok(NodeSessionState {
            args,
            node: None,
            draining: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeSessionMsg::Frame(frame) => {
                let ((node, instance), frame) = match (&st.node, frame) {
                    (None, FromNode::Register(mut registration)) => {
                        if let Some(der) = &st.args.certificate
                            && !certificate_is_for(der, &registration.node_name)
                        {
                            let why = format!(
                                "the client certificate is not for node `{}`: a node's name must be one of its certificate's DNS names",
                                registration.node_name
                            );
                            st.close_with(&myself, tonic::Code::PermissionDenied, why);
                            return Ok(());
                        }
                        // The node serves the namespaces its stream was opened in, whatever
                        // labels it claims.
                        let mut served: Vec<&str> =
                            st.args.namespaces.iter().map(Namespace::as_str).collect();
                        served.sort_unstable();
                        served.dedup();
                        let ns = served.join(",");
                        registration
                            .labels
                            .insert(NAMESPACE_LABEL.to_owned(), ns.clone());
                        for card in &mut registration.agents {
                            card.labels.insert(NAMESPACE_LABEL.to_owned(), ns.clone());
                        }
                        let session = myself.clone();
                        let tx = st.args.tx.clone();
                        let registry = st.args.registry.get();
                        let answer = registry
                            .call(
                                |reply| RegistryMsg::Register {
                                    registration,
                                    session,
                                    tx,
                                    reply,
                                },
                                Some(REGISTER_TIMEOUT),
                            )
                            .await;
                        match call_result("registry", answer) {
                            Ok(Err(why)) => st.close(&myself, why),
                            Ok(Ok(registered)) => {
                                st.node = Some((registered.node_id.clone(), registered.instance));
                                let _ = st
                                    .args
                                    .tx
                                    .try_send(Outbound::Frame(ToNode::Registered(registered)));
                            }
                            Err(e) => st.close(&myself, format!("registration failed: {e}")),
                        }
                        return Ok(());
                    }
                    (None, _) => {
                        st.close(
                            &myself,
                            "the first frame on a node stream must be `register`".into(),
                        );
                        return Ok(());
                    }
                    (Some(_), FromNode::Register(_)) => {
                        st.close(&myself, "`register` sent twice on one stream".into());
                        return Ok(());
                    }
                    (Some(id), frame) => (id.clone(), frame),
                };
                match frame {
                    FromNode::Register(_) => unreachable!("handled above"),
                    FromNode::Heartbeat { instance: beat } if beat != instance => {
                        st.close(
                            &myself,
                            format!(
                                "heartbeat for instance {beat} on the stream of instance {instance}"
                            ),
                        );
                    }
                    FromNode::Heartbeat { .. } => st.args.registry.cast(RegistryMsg::Heartbeat {
                        node,
                        instance,
                        session: myself.clone(),
                    }),
                    FromNode::Result(result) => st.args.dispatcher.cast(DispatcherMsg::Result {
                        node,
                        instance,
                        result,
                        tx: st.args.tx.clone(),
                    }),
                    FromNode::Progress(progress) => {
                        st.args.dispatcher.cast(DispatcherMsg::Report {
                            node,
                            instance,
                            report: Report::Progress(progress),
                        })
                    }
                    FromNode::Delta(delta) => st.args.dispatcher.cast(DispatcherMsg::Report {
                        node,
                        instance,
                        report: Report::Delta(delta),
                    }),
                    FromNode::SkillCall(call) => st.args.dispatcher.cast(DispatcherMsg::Report {
                        node,
                        instance,
                        report: Report::SkillCall(call),
                    }),
                    FromNode::ToolApproval(ask) => st.args.dispatcher.cast(DispatcherMsg::Report {
                        node,
                        instance,
                        report: Report::ToolApproval(ask),
                    }),
                    FromNode::ToolUsed(used) => st.args.dispatcher.cast(DispatcherMsg::Report {
                        node,
                        instance,
                        report: Report::ToolUsed(used),
                    }),
                    FromNode::SendMessage(send) => {
                        st.args.dispatcher.cast(DispatcherMsg::Message {
                            node,
                            instance,
                            send,
                            tx: st.args.tx.clone(),
                        })
                    }
                    FromNode::MessageAck { delivery, outcome } => {
                        st.args.dispatcher.cast(DispatcherMsg::MessageAck {
                            node,
                            instance,
                            delivery,
                            outcome,
                        })
                    }
                    FromNode::Draining => {
                        st.draining = true;
                        st.args
                            .registry
                            .cast(RegistryMsg::Draining { node, instance });
                    }
                    FromNode::AgentDown { agent, reason } => {
                        warn!(%node, %agent, %reason, "agent reported down");
                        st.args.registry.cast(RegistryMsg::AgentDown {
                            node,
                            instance,
                            agent,
                        });
                    }
                }
            }
            NodeSessionMsg::Closed(why) => {
                if let Some((node, instance)) = &st.node {
                    info!(%node, instance, %why, draining = st.draining, "node stream ended");
                }
                let clean = st.draining;
                st.disconnect(clean);
                myself.stop(None);
            }
            NodeSessionMsg::Close(code, reason) => {
                if let Some((node, instance)) = &st.node {
                    info!(%node, instance, %reason, "closing node stream");
                }
                st.close_with(&myself, code, reason);
            }
        }
        Ok(())
    }
}
