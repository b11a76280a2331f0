//! What a relay grants a node that registers, sans-IO: the rules for its service list
//! (how many, which names, which are listed twice, which want a public port) and for
//! the relay's room for one more node.
//!
//! The driver (`server::register`) asks the port table only for the ports this plan
//! names ([`Registration::public_ports_wanted`]), reports each answer back
//! ([`Registration::port_answer`]), and sends the grants the plan ends with. The rules
//! stay testable without sockets, ports or a port file.

use std::collections::BTreeSet;

use ferry_proto::frame::{self, ServiceGrant, ServiceRequest};

/// Services one node may register at once.
pub const MAX_SERVICES_PER_NODE: usize = 64;

/// Why a relay will not take one more node, or `None` when it will: a node already
/// connected (reconnecting, or replacing its own session) always finds room.
pub fn refusal_when_full(connected: usize, max_nodes: usize, already_here: bool) -> Option<String> {
    (connected >= max_nodes && !already_here).then(|| {
        format!("this relay is full ({max_nodes} nodes, its max_nodes); try another relay or later")
    })
}

/// One registration being decided: a grant per requested service, in the node's order.
#[derive(Debug)]
pub struct Registration {
    grants: Vec<ServiceGrant>,
    /// Indices of grants that wait for a public port.
    wanted: Vec<usize>,
}

impl Registration {
    /// Decides everything that needs no port table: the first
    /// [`MAX_SERVICES_PER_NODE`] services are considered, names must be valid, and a
    /// name listed twice is refused the second time (the first stands).
    pub fn plan(services: &[ServiceRequest]) -> Self {
        let mut grants = Vec::with_capacity(services.len());
        let mut wanted = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, req) in services.iter().enumerate() {
            let error = if i >= MAX_SERVICES_PER_NODE {
                Some(format!(
                    "a node may register at most {MAX_SERVICES_PER_NODE} services"
                ))
            } else if let Err(e) = frame::validate_service_name(&req.name) {
                Some(e)
            } else if !seen.insert(req.name.as_str()) {
                Some(format!("service {:?} is listed twice", req.name))
            } else {
                if req.public {
                    wanted.push(i);
                }
                None
            };
            grants.push(ServiceGrant {
                name: req.name.clone(),
                public_addr: None,
                public_port: None,
                error,
            });
        }
        Registration { grants, wanted }
    }

    /// The services (index, name) whose public port the driver must find.
    pub fn public_ports_wanted(&self) -> impl Iterator<Item = (usize, &str)> + '_ {
        self.wanted
            .iter()
            .map(|&i| (i, self.grants[i].name.as_str()))
    }

    /// The port table's answer for service `index`: its port (reachable at
    /// `public_host`), or why it has none.
    pub fn port_answer(&mut self, index: usize, answer: Result<u16, String>, public_host: &str) {
        let Some(grant) = self.grants.get_mut(index) else {
            return;
        };
        match answer {
            Ok(port) => {
                grant.public_port = Some(port);
                grant.public_addr = Some(ferry_proto::net::host_port(public_host, port));
            }
            Err(e) => grant.error = Some(e),
        }
    }

    /// The grants to send, and the public ports the node keeps listening on (every
    /// other port of the node stops listening; its assignment stays reserved).
    pub fn finish(self) -> (Vec<ServiceGrant>, BTreeSet<u16>) {
        let listening = self.grants.iter().filter_map(|g| g.public_port).collect();
        (self.grants, listening)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, public: bool) -> ServiceRequest {
        ServiceRequest {
            name: name.into(),
            public,
        }
    }

    fn errors(grants: &[ServiceGrant]) -> Vec<Option<&str>> {
        grants.iter().map(|g| g.error.as_deref()).collect()
    }

    #[test]
    fn private_services_are_granted_without_a_port() {
        let plan = Registration::plan(&[req("storage", false), req("web", false)]);
        assert_eq!(plan.public_ports_wanted().count(), 0);
        let (grants, listening) = plan.finish();
        assert_eq!(errors(&grants), [None, None]);
        assert!(grants.iter().all(|g| g.public_port.is_none()));
        assert!(listening.is_empty());
    }

    #[test]
    fn public_services_get_the_port_the_table_answers() {
        let mut plan = Registration::plan(&[req("storage", true), req("web", false)]);
        let wanted: Vec<_> = plan
            .public_ports_wanted()
            .map(|(i, n)| (i, n.to_string()))
            .collect();
        assert_eq!(wanted, [(0, "storage".to_string())]);
        plan.port_answer(0, Ok(20001), "relay.example.net");
        let (grants, listening) = plan.finish();
        assert_eq!(grants[0].public_port, Some(20001));
        assert_eq!(
            grants[0].public_addr.as_deref(),
            Some("relay.example.net:20001")
        );
        assert_eq!(listening, BTreeSet::from([20001]));
    }

    #[test]
    fn an_ipv6_relay_host_is_bracketed() {
        let mut plan = Registration::plan(&[req("storage", true)]);
        plan.port_answer(0, Ok(20001), "2001:db8::1");
        let (grants, _) = plan.finish();
        assert_eq!(
            grants[0].public_addr.as_deref(),
            Some("[2001:db8::1]:20001")
        );
    }

    #[test]
    fn a_port_the_table_refuses_is_an_error_on_that_service_only() {
        let mut plan = Registration::plan(&[req("a", true), req("b", true)]);
        plan.port_answer(0, Err("no bindable public port found".into()), "h");
        plan.port_answer(1, Ok(20002), "h");
        let (grants, listening) = plan.finish();
        assert_eq!(
            errors(&grants),
            [Some("no bindable public port found"), None]
        );
        assert_eq!(listening, BTreeSet::from([20002]));
    }

    #[test]
    fn a_service_listed_twice_is_refused_the_second_time() {
        let plan = Registration::plan(&[req("storage", true), req("storage", false)]);
        assert_eq!(
            plan.public_ports_wanted()
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            [0]
        );
        let (grants, _) = plan.finish();
        assert_eq!(
            errors(&grants),
            [None, Some("service \"storage\" is listed twice")]
        );
    }

    #[test]
    fn at_most_64_services_and_the_rest_are_refused_by_name() {
        let services: Vec<_> = (0..70).map(|i| req(&format!("s{i}"), true)).collect();
        let plan = Registration::plan(&services);
        assert_eq!(plan.public_ports_wanted().count(), MAX_SERVICES_PER_NODE);
        let (grants, _) = plan.finish();
        assert_eq!(grants.len(), 70, "every request is answered");
        assert!(grants[..64].iter().all(|g| g.error.is_none()));
        for g in &grants[64..] {
            assert_eq!(
                g.error.as_deref(),
                Some("a node may register at most 64 services"),
                "{}",
                g.name
            );
        }
    }

    #[test]
    fn an_invalid_name_is_refused_and_never_asks_for_a_port() {
        let plan = Registration::plan(&[req("", true), req("bad name", true), req("ok", true)]);
        assert_eq!(
            plan.public_ports_wanted()
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            [2]
        );
        let (grants, _) = plan.finish();
        assert!(grants[0].error.is_some() && grants[1].error.is_some());
        assert!(grants[2].error.is_none());
    }

    #[test]
    fn an_answer_for_an_unknown_index_changes_nothing() {
        let mut plan = Registration::plan(&[req("a", true)]);
        plan.port_answer(7, Ok(1), "h");
        let (grants, listening) = plan.finish();
        assert_eq!(grants[0].public_port, None);
        assert!(listening.is_empty());
    }

    #[test]
    fn a_full_relay_refuses_new_nodes_but_not_returning_ones() {
        assert_eq!(refusal_when_full(9, 10, false), None);
        let full = refusal_when_full(10, 10, false).expect("full");
        assert!(
            full.contains("full (10 nodes") && full.contains("try another relay"),
            "{full}"
        );
        assert_eq!(refusal_when_full(10, 10, true), None);
    }
}
