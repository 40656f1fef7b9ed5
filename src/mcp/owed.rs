//! Which requests of a forwarded message (or batch) an answer still owes a response to, as
//! the relayed messages show it: what ends a call's stream at its last response, and, when the
//! gateway gives up first, which requests get its error in their place and a cancellation.

use crate::mcp::jsonrpc::{Body, Kind, RpcId};

/// The requests a relayed answer still owes a response to.
pub enum Owed {
    /// A single call's (`None` once answered).
    One(Option<RpcId>),
    /// A batch's, in its order, and how many times each id is still owed (a batch may use an
    /// id twice; a map, since a body's worth of requests would make a list's search quadratic).
    Batch {
        /// Every request's id, in the batch's order.
        order: Vec<RpcId>,
        /// How many requests with each id are still owed.
        left: std::collections::HashMap<RpcId, u32, foldhash::fast::RandomState>,
        /// How many requests are still owed, in all.
        count: usize,
    },
}

impl Owed {
    /// What a batch's answer owes: a response to each of `ids`, in their order.
    pub fn batch(ids: impl IntoIterator<Item = RpcId>) -> Self {
        let order: Vec<RpcId> = ids.into_iter().collect();
        let mut left = std::collections::HashMap::with_hasher(Default::default());
        for id in &order {
            *left.entry(id.clone()).or_insert(0u32) += 1;
        }
        Owed::Batch {
            count: order.len(),
            order,
            left,
        }
    }

    /// What the answer to `body` owes a client that reads an array of responses as answers
    /// (a legacy, 2024-11-05, client: batches are its protocol's), so that an array answers a
    /// single request too: a response to each of its requests. `None` when it holds none
    /// (notifications and responses are answered by nothing).
    pub fn of_body(body: &Body) -> Option<Self> {
        let owed = Owed::batch(
            body.messages()
                .iter()
                .filter(|m| m.kind == Kind::Request)
                .filter_map(|m| m.id.clone()),
        );
        (!owed.settled()).then_some(owed)
    }

    /// Whether a batch is owed (its answer may come as one array of responses).
    pub fn is_batch(&self) -> bool {
        matches!(self, Owed::Batch { .. })
    }

    /// A response with `id` went by: one request with that id, if any is owed, is answered.
    pub fn answer(&mut self, id: RpcId) {
        match self {
            Owed::One(owed) => {
                if owed.as_ref() == Some(&id) {
                    *owed = None;
                }
            }
            Owed::Batch { left, count, .. } => {
                if let Some(n) = left.get_mut(&id)
                    && *n > 0
                {
                    *n -= 1;
                    *count -= 1;
                }
            }
        }
    }

    /// A message relayed to the client (one JSON text): each response it holds is answered,
    /// read as the client reads it ([`crate::mcp::jsonrpc::response_ids`]).
    pub fn read(&mut self, message: &[u8]) {
        let batch = self.is_batch();
        crate::mcp::jsonrpc::response_ids(message, batch, |id| self.answer(id));
    }

    /// Whether nothing is owed any more.
    pub fn settled(&self) -> bool {
        match self {
            Owed::One(owed) => owed.is_none(),
            Owed::Batch { count, .. } => *count == 0,
        }
    }

    /// The ids still owed, in the batch's order.
    pub fn unanswered(&self) -> Vec<RpcId> {
        match self {
            Owed::One(owed) => owed.iter().cloned().collect(),
            Owed::Batch { order, .. } => order
                .iter()
                .zip(self.still_owed())
                .filter(|(_, owed)| *owed)
                .map(|(id, _)| id.clone())
                .collect(),
        }
    }

    /// How many responses with `id` this answer has carried for its own requests.
    pub fn answered_count(&self, id: &RpcId) -> u32 {
        match self {
            // Asked of what is still owed: a single call's answer carried none.
            Owed::One(_) => 0,
            Owed::Batch { order, left, .. } => {
                let asked = order.iter().filter(|o| *o == id).count();
                u32::try_from(asked)
                    .unwrap_or(u32::MAX)
                    .saturating_sub(left.get(id).copied().unwrap_or(0))
            }
        }
    }

    /// Whether each request is still owed, in the batch's order (a single call: one). Of two
    /// requests with one id, one of them answered, the first is taken as the one still owed
    /// (which it was cannot be told).
    pub fn still_owed(&self) -> Vec<bool> {
        match self {
            Owed::One(owed) => vec![owed.is_some()],
            Owed::Batch { order, left, .. } => {
                let mut left = left.clone();
                order
                    .iter()
                    .map(|id| {
                        left.get_mut(id).is_some_and(|n| {
                            let owed = *n > 0;
                            *n = n.saturating_sub(1);
                            owed
                        })
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_owes_each_request_its_response_in_order_a_reused_id_twice() {
        let mut owed = Owed::batch([
            RpcId::Num(1),
            RpcId::Str("a".into()),
            RpcId::Num(1),
            RpcId::Num(3),
        ]);
        owed.answer(RpcId::Num(1));
        owed.answer(RpcId::Num(9));
        owed.answer(RpcId::Str("3".into()));
        assert!(!owed.settled());
        // Which of two requests with one id was answered cannot be told: one of them is owed.
        assert_eq!(
            owed.unanswered(),
            [RpcId::Num(1), RpcId::Str("a".into()), RpcId::Num(3)]
        );
        // A response given twice answers one request each time; a third, nothing.
        for id in [RpcId::Num(1), RpcId::Num(1), RpcId::Str("a".into())] {
            owed.answer(id);
        }
        assert_eq!(owed.unanswered(), [RpcId::Num(3)]);
        assert_eq!(owed.still_owed(), [false, false, false, true]);
        owed.answer(RpcId::Num(3));
        assert!(owed.settled() && owed.unanswered().is_empty());
        let mut one = Owed::One(Some(RpcId::Num(1)));
        assert_eq!(one.unanswered(), [RpcId::Num(1)]);
        one.answer(RpcId::Num(1));
        assert!(one.settled() && one.unanswered().is_empty());
    }

    #[test]
    fn a_body_owes_its_requests_only_and_a_batch_answer_may_come_as_an_array() {
        let mut classifier = crate::mcp::jsonrpc::Classifier::new();
        let mut parse = |text: &str| classifier.classify(text.as_bytes()).unwrap();
        let note = parse(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert!(Owed::of_body(&note).is_none());
        let batch = parse(
            r#"[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":"x","method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
        );
        let mut owed = Owed::of_body(&batch).expect("two requests");
        owed.read(br#"[{"jsonrpc":"2.0","id":"x","result":{}},{"jsonrpc":"2.0","method":"notifications/progress","id":2}]"#);
        assert_eq!(owed.unanswered(), [RpcId::Num(2)]);
        owed.read(br#"{"jsonrpc":"2.0","id":2.0,"error":{"code":-1,"message":"no"}}"#);
        assert!(owed.settled());
        let single = parse(r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#);
        let mut one = Owed::of_body(&single).expect("a request");
        // Its client reads an array of responses, so an array answers it too.
        one.read(br#"[{"jsonrpc":"2.0","id":7,"result":{}}]"#);
        assert!(one.settled());
        // A client that reads no arrays (a single call's, since 2025-06-18): only an object.
        let mut strict = Owed::One(Some(RpcId::Num(7)));
        strict.read(br#"[{"jsonrpc":"2.0","id":7,"result":{}}]"#);
        assert!(!strict.settled());
        strict.read(br#"{"jsonrpc":"2.0","id":7,"result":{}}"#);
        assert!(strict.settled());
    }
}
