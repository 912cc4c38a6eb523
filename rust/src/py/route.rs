//! `Router`: the routing table, seen from Python.

use std::net::IpAddr;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::route::{Prefix, Query, Role, RouteTable, RuleId, SockKind, StackId};

/// A routing table: rules from destination prefix (plus port range, socket
/// kind and role) to an ordered list of stack ids. Longest prefix wins, then
/// priority, then the earlier rule.
#[pyclass(module = "dmm._core")]
#[derive(Default)]
pub struct Router {
    table: RouteTable,
}

pub fn parse_kind(kind: &str) -> PyResult<SockKind> {
    match kind {
        "stream" => Ok(SockKind::Stream),
        "dgram" => Ok(SockKind::Dgram),
        other => Err(PyValueError::new_err(format!(
            "socket kind must be 'stream' or 'dgram', got {other:?}"
        ))),
    }
}

fn parse_role(role: &str) -> PyResult<Role> {
    match role {
        "connect" => Ok(Role::Connect),
        "listen" => Ok(Role::Listen),
        "sendto" => Ok(Role::SendTo),
        "accept" => Ok(Role::Accept),
        other => Err(PyValueError::new_err(format!(
            "role must be 'connect', 'listen', 'sendto' or 'accept', got {other:?}"
        ))),
    }
}

fn parse_addr(addr: &str) -> PyResult<IpAddr> {
    // Drop an IPv6 zone ("fe80::1%eth0"): routes do not match on it.
    let bare = addr.split('%').next().unwrap_or(addr);
    bare.parse()
        .map_err(|_| PyValueError::new_err(format!("not an IP address: {addr:?}")))
}

#[pymethods]
impl Router {
    /// An empty table whose default route is empty.
    #[new]
    fn new() -> Self {
        Router::default()
    }

    /// Adds a rule and returns its id.
    #[pyo3(signature = (prefix, stacks, *, ports = (0, 65535), kind = None, role = None, priority = 0, tag = 0))]
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        prefix: &str,
        stacks: Vec<StackId>,
        ports: (u16, u16),
        kind: Option<&str>,
        role: Option<&str>,
        priority: i32,
        tag: u32,
    ) -> PyResult<u32> {
        let prefix: Prefix = prefix
            .parse()
            .map_err(|e| PyValueError::new_err(format!("{e}")))?;
        if ports.0 > ports.1 {
            return Err(PyValueError::new_err(format!(
                "port range {}-{} is empty",
                ports.0, ports.1
            )));
        }
        let mut rule = crate::route::Rule::new(prefix, stacks);
        rule.ports = ports.0..=ports.1;
        rule.kind = kind.map(parse_kind).transpose()?;
        rule.role = role.map(parse_role).transpose()?;
        rule.priority = priority;
        rule.tag = tag;
        Ok(self.table.insert(rule).as_u32())
    }

    /// Removes a rule by id; returns whether it existed.
    fn remove(&mut self, rule_id: u32) -> bool {
        self.table.remove(RuleId::from_u32(rule_id)).is_some()
    }

    /// Sets the stacks used when no rule matches.
    fn set_default(&mut self, stacks: Vec<StackId>) {
        self.table.set_default(stacks);
    }

    /// Number of rules.
    fn __len__(&self) -> usize {
        self.table.len()
    }

    /// Decides for one request: `(tag, stacks)`, with `tag` None for the
    /// default route.
    fn lookup(
        &self,
        addr: &str,
        port: u16,
        kind: &str,
        role: &str,
    ) -> PyResult<(Option<u32>, Vec<StackId>)> {
        let q = Query {
            addr: parse_addr(addr)?,
            port,
            kind: parse_kind(kind)?,
            role: parse_role(role)?,
        };
        let d = self.table.lookup(&q);
        let tag = d.rule.and_then(|id| self.table.get(id)).map(|r| r.tag);
        Ok((tag, d.stacks.to_vec()))
    }

    /// Every matching rule's tag, best first (for `dmm route explain`).
    fn candidates(&self, addr: &str, port: u16, kind: &str, role: &str) -> PyResult<Vec<u32>> {
        let q = Query {
            addr: parse_addr(addr)?,
            port,
            kind: parse_kind(kind)?,
            role: parse_role(role)?,
        };
        Ok(self
            .table
            .candidates(&q)
            .into_iter()
            .filter_map(|id| self.table.get(id))
            .map(|r| r.tag)
            .collect())
    }
}
