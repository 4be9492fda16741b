//! The authorisation policy: the one place where yunqi decides who may do what.
//!
//! Deny by default: [`authorize`] allows only what one of its rules names; anything else is
//! `permission_denied`. Callers never check roles themselves.

use yunqi_types::{Error, Name, Principal, Role};

/// An action on an object, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Create a department.
    DepartmentCreate {
        /// The new department's name.
        name: &'a Name,
    },
    /// List or read departments.
    DepartmentRead,
    /// Create a principal.
    PrincipalCreate {
        /// Its name.
        name: &'a Name,
        /// Its department.
        department: Option<&'a Name>,
        /// Its role.
        role: Role,
    },
    /// Read a principal.
    PrincipalRead {
        /// The principal.
        principal: &'a Principal,
    },
    /// Create, list or revoke tokens of a principal.
    TokenManage {
        /// Whose tokens.
        owner: &'a Principal,
    },
    /// Create a dataset in a department, import into it, or declare its column classes.
    DatasetWrite {
        /// `department.name`.
        dataset: &'a str,
        /// Its department.
        department: &'a Name,
    },
    /// Read the catalog: datasets' descriptions, schemas, classes, versions (not their data).
    CatalogRead,
    /// Query a dataset's data.
    DatasetQuery {
        /// `department.name`.
        dataset: &'a str,
        /// Its department.
        department: &'a str,
    },
    /// Ask for a grant on another department's dataset.
    GrantRequest {
        /// `department.name`.
        dataset: &'a str,
        /// The dataset's department.
        owner: &'a str,
    },
    /// Approve or refuse a grant request.
    GrantDecide {
        /// The grant.
        id: &'a str,
        /// The dataset's department.
        owner: &'a str,
    },
    /// Revoke an approved grant.
    GrantRevoke {
        /// The grant.
        id: &'a str,
        /// The dataset's department.
        owner: &'a str,
        /// The department holding the grant.
        grantee: &'a str,
    },
    /// See a grant or request.
    GrantRead {
        /// The grant.
        id: &'a str,
        /// The dataset's department.
        owner: &'a str,
        /// The department holding the grant.
        grantee: &'a str,
    },
    /// Query another department's dataset under a grant held by one's department.
    GrantUse {
        /// The grant.
        id: &'a str,
        /// The department holding the grant.
        grantee: &'a str,
    },
    /// Apply (declare or change) a citizen service's definition.
    ServiceManage {
        /// `department.name`.
        service: &'a str,
        /// Its department.
        department: &'a str,
    },
    /// Apply for a service, as one of the applicants it names.
    ServiceApply {
        /// `department.name`.
        service: &'a str,
        /// The roles the service takes applications from.
        applicants: &'a [Role],
    },
    /// Withdraw a document a service issued.
    DocumentRevoke {
        /// `department.name` of the service.
        service: &'a str,
        /// Its department.
        department: &'a str,
    },
    /// Work on a service's applications: the review queue, assigning, approving and refusing.
    ServiceReview {
        /// `department.name` of the service.
        service: &'a str,
        /// Its department.
        department: &'a str,
    },
    /// Send events to a stream.
    StreamAppend {
        /// `department.name`.
        stream: &'a str,
        /// Its department.
        department: &'a str,
    },
    /// Read the audit chain for everyone (admin), a department (steward) or oneself.
    AuditRead {
        /// The department the query is restricted to, if any.
        department: Option<&'a str>,
        /// The principal the query is restricted to, if any.
        principal: Option<&'a str>,
    },
}

impl Action<'_> {
    /// The audit action name, `kind.verb`.
    pub fn audit_action(&self) -> &'static str {
        match self {
            Action::DepartmentCreate { .. } => "department.create",
            Action::DepartmentRead => "department.read",
            Action::PrincipalCreate { .. } => "principal.create",
            Action::PrincipalRead { .. } => "principal.read",
            Action::TokenManage { .. } => "token.manage",
            Action::DatasetWrite { .. } => "dataset.write",
            Action::CatalogRead => "catalog.read",
            Action::DatasetQuery { .. } => "dataset.query",
            Action::AuditRead { .. } => "audit.read",
            Action::GrantRequest { .. } => "grant.request",
            Action::GrantDecide { .. } => "grant.decide",
            Action::GrantRevoke { .. } => "grant.revoke",
            Action::GrantRead { .. } => "grant.read",
            Action::GrantUse { .. } => "grant.use",
            Action::StreamAppend { .. } => "stream.append",
            Action::ServiceManage { .. } => "service.define",
            Action::ServiceApply { .. } => "service.apply",
            Action::DocumentRevoke { .. } => "document.revoke",
            Action::ServiceReview { .. } => "service.review",
        }
    }

    /// The audit object, `kind:name`.
    pub fn audit_object(&self) -> String {
        match self {
            Action::DepartmentCreate { name } => format!("department:{name}"),
            Action::DepartmentRead => "department:*".into(),
            Action::PrincipalCreate { name, .. } => format!("principal:{name}"),
            Action::PrincipalRead { principal } => format!("principal:{}", principal.name),
            Action::TokenManage { owner } => format!("principal:{}", owner.name),
            Action::DatasetWrite { dataset, .. } | Action::DatasetQuery { dataset, .. } => {
                format!("dataset:{dataset}")
            }
            Action::CatalogRead => "catalog".into(),
            Action::AuditRead { .. } => "audit".into(),
            Action::GrantRequest { dataset, .. } => format!("dataset:{dataset}"),
            Action::GrantDecide { id, .. }
            | Action::GrantRevoke { id, .. }
            | Action::GrantRead { id, .. }
            | Action::GrantUse { id, .. } => format!("grant:{id}"),
            Action::StreamAppend { stream, .. } => format!("stream:{stream}"),
            Action::ServiceManage { service, .. }
            | Action::ServiceApply { service, .. }
            | Action::DocumentRevoke { service, .. }
            | Action::ServiceReview { service, .. } => format!("service:{service}"),
        }
    }
}

fn describe(actor: &Principal) -> String {
    match &actor.department {
        Some(d) => format!(
            "principal \"{}\" ({} of department \"{d}\")",
            actor.name, actor.role
        ),
        None => format!("principal \"{}\" ({})", actor.name, actor.role),
    }
}

/// Decides whether `actor` may perform `action`. The platform admin may do anything but read
/// departments' data.
pub fn authorize(actor: &Principal, action: &Action<'_>) -> Result<(), Error> {
    let same_department = |d: Option<&Name>| d.is_some() && d == actor.department.as_ref();
    let allowed = match (actor.role, action) {
        // Separation of duties: the admin reads no department's data and does not decide
        // who else may read it (it may still revoke a grant, to stop a leak).
        (
            Role::Admin,
            Action::DatasetQuery { .. }
            | Action::GrantRequest { .. }
            | Action::GrantDecide { .. }
            | Action::GrantUse { .. }
            | Action::StreamAppend { .. }
            | Action::ServiceManage { .. }
            | Action::ServiceApply { .. }
            | Action::DocumentRevoke { .. }
            | Action::ServiceReview { .. },
        ) => false,
        (Role::Admin, _) => true,
        (_, Action::DepartmentRead) => true,
        (
            Role::Steward,
            Action::PrincipalCreate {
                department, role, ..
            },
        ) => {
            same_department(*department)
                && matches!(
                    role,
                    Role::Steward | Role::Analyst | Role::Officer | Role::Service
                )
        }
        (_, Action::PrincipalRead { principal })
        | (_, Action::TokenManage { owner: principal }) => {
            principal.name == actor.name
                || (actor.role == Role::Steward
                    && principal.role != Role::Admin
                    && same_department(principal.department.as_ref()))
        }
        (
            Role::Steward,
            Action::AuditRead {
                department,
                principal,
            },
        ) => {
            department.is_some_and(|d| Some(d) == actor.department.as_ref().map(Name::as_str))
                || *principal == Some(actor.name.as_str())
        }
        (_, Action::AuditRead { principal, .. }) => *principal == Some(actor.name.as_str()),
        // Stewards own their department's data. The platform admin runs the platform and
        // reads no department's data: separation of duties.
        (Role::Steward, Action::DatasetWrite { department, .. }) => {
            same_department(Some(department))
        }
        // A department's stewards declare its services; people apply in the roles a service
        // names (the admin runs the platform and does neither).
        (Role::Steward, Action::ServiceManage { department, .. }) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() == *department),
        (
            Role::Steward | Role::Officer,
            Action::DocumentRevoke { department, .. } | Action::ServiceReview { department, .. },
        ) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() == *department),
        (role, Action::ServiceApply { applicants, .. }) => {
            role != Role::Admin && applicants.contains(&role)
        }
        // Devices and agents send events with a service account of the stream's department.
        (Role::Steward | Role::Service, Action::StreamAppend { department, .. }) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() == *department),
        (Role::Citizen, Action::CatalogRead) => false,
        (_, Action::CatalogRead) => true,
        (
            Role::Steward | Role::Analyst | Role::Officer | Role::Service,
            Action::DatasetQuery { department, .. }
            | Action::GrantUse {
                grantee: department,
                ..
            },
        ) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() == *department),
        // A department asks for what it does not own; its own data needs no grant.
        (Role::Steward | Role::Analyst, Action::GrantRequest { owner, .. }) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() != *owner),
        (Role::Steward, Action::GrantDecide { owner, .. }) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() == *owner),
        // The owner stops sharing; the grantee gives up what it no longer needs.
        (Role::Steward, Action::GrantRevoke { owner, grantee, .. }) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() == *owner || d.as_str() == *grantee),
        (
            Role::Steward | Role::Analyst | Role::Officer | Role::Service,
            Action::GrantRead { owner, grantee, .. },
        ) => actor
            .department
            .as_ref()
            .is_some_and(|d| d.as_str() == *owner || d.as_str() == *grantee),
        _ => false,
    };
    if allowed {
        return Ok(());
    }
    let (message, hint) = match action {
        Action::DepartmentCreate { .. } => (
            "permission denied to create departments".to_string(),
            "ask a platform admin".to_string(),
        ),
        Action::PrincipalCreate {
            department: Some(d),
            role,
            ..
        } => (
            format!(
                "permission denied to create a principal with role \"{role}\" in department \"{d}\""
            ),
            format!("ask a platform admin or a steward of department \"{d}\""),
        ),
        Action::PrincipalCreate {
            department: None,
            role,
            ..
        } => (
            format!("permission denied to create a principal with role \"{role}\""),
            "ask a platform admin".to_string(),
        ),
        Action::PrincipalRead { principal } | Action::TokenManage { owner: principal } => (
            format!("permission denied for principal \"{}\"", principal.name),
            match &principal.department {
                Some(d) => format!("ask a platform admin or a steward of department \"{d}\""),
                None => "ask a platform admin".to_string(),
            },
        ),
        Action::AuditRead { .. } => (
            "permission denied to read these audit records".to_string(),
            "stewards read their department's records, everyone else their own; add \
             department= or principal= accordingly"
                .to_string(),
        ),
        Action::DatasetWrite {
            dataset,
            department,
        } => (
            format!("permission denied for dataset \"{dataset}\""),
            format!("only stewards of department \"{department}\" manage its datasets"),
        ),
        Action::ServiceManage {
            service,
            department,
        } => (
            format!("permission denied to change service \"{service}\""),
            format!("only stewards of department \"{department}\" declare its services"),
        ),
        Action::ServiceApply {
            service,
            applicants,
        } => (
            format!("permission denied to apply for service \"{service}\""),
            format!(
                "it takes applications from: {}",
                applicants
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Action::DocumentRevoke {
            service,
            department,
        } => (
            format!("permission denied to revoke documents of \"{service}\""),
            format!("officers and stewards of department \"{department}\" revoke its documents"),
        ),
        Action::ServiceReview {
            service,
            department,
        } => (
            format!("permission denied to review applications to \"{service}\""),
            format!("officers and stewards of department \"{department}\" review its applications"),
        ),
        Action::StreamAppend { stream, department } => (
            format!("permission denied to send events to stream \"{stream}\""),
            format!(
                "events are sent by service accounts (or stewards) of department \"{department}\""
            ),
        ),
        Action::CatalogRead => (
            "permission denied to read the catalog".to_string(),
            "the catalog is for the staff of departments".to_string(),
        ),
        Action::DatasetQuery {
            dataset,
            department,
        } => (
            format!("permission denied for dataset \"{dataset}\""),
            format!(
                "the data of department \"{department}\" is read by its own staff; other departments need a grant"
            ),
        ),
        Action::GrantRequest { dataset, owner } => (
            format!("permission denied to request a grant on dataset \"{dataset}\""),
            if actor
                .department
                .as_ref()
                .is_some_and(|d| d.as_str() == *owner)
            {
                format!("department \"{owner}\" owns this dataset and reads it without a grant")
            } else {
                "stewards and analysts of a department request grants for it".to_string()
            },
        ),
        Action::GrantDecide { id, owner } => (
            format!("permission denied to decide grant \"{id}\""),
            format!("a steward of department \"{owner}\", which owns the dataset, decides"),
        ),
        Action::GrantRevoke { id, owner, grantee } => (
            format!("permission denied to revoke grant \"{id}\""),
            format!(
                "stewards of department \"{owner}\" (the owner) or \"{grantee}\" (the grantee) revoke it"
            ),
        ),
        Action::GrantRead { id, .. } => (
            format!("permission denied for grant \"{id}\""),
            "grants are seen by the staff of the owning and the receiving department".to_string(),
        ),
        Action::GrantUse { id, grantee } => (
            format!("permission denied to use grant \"{id}\""),
            format!("grant \"{id}\" is held by department \"{grantee}\" for its staff"),
        ),
        Action::DepartmentRead => unreachable_read(),
    };
    Err(Error::denied(message)
        .detail(format!(
            "{} is not allowed to {}",
            describe(actor),
            action.audit_action()
        ))
        .hint(hint))
}

/// Reading departments is allowed to every role; the arm exists only to keep the match total.
fn unreachable_read() -> (String, String) {
    (
        "permission denied to read departments".to_string(),
        "ask a platform admin".to_string(),
    )
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn principal(name: &str, role: Role, dept: Option<&str>) -> Principal {
        Principal {
            name: Name::parse("principal", name).unwrap(),
            role,
            department: dept.map(|d| Name::parse("department", d).unwrap()),
            id_number: None,
            display_name: name.into(),
            created_at: Utc::now(),
        }
    }

    fn n(s: &str) -> Name {
        Name::parse("x", s).unwrap()
    }

    #[test]
    fn steward_manages_only_own_department() {
        let steward = principal("sam", Role::Steward, Some("transport"));
        let transport = n("transport");
        let traffic = n("traffic");
        let new = n("newbie");
        assert!(
            authorize(
                &steward,
                &Action::PrincipalCreate {
                    name: &new,
                    department: Some(&transport),
                    role: Role::Analyst
                }
            )
            .is_ok()
        );
        let e = authorize(
            &steward,
            &Action::PrincipalCreate {
                name: &new,
                department: Some(&traffic),
                role: Role::Analyst,
            },
        )
        .unwrap_err();
        assert_eq!(e.code, yunqi_types::ErrorCode::PermissionDenied);
        assert!(e.hint.unwrap().contains("traffic"));
        assert!(
            authorize(
                &steward,
                &Action::PrincipalCreate {
                    name: &new,
                    department: Some(&transport),
                    role: Role::Admin
                }
            )
            .is_err()
        );
        assert!(
            authorize(
                &steward,
                &Action::PrincipalCreate {
                    name: &new,
                    department: None,
                    role: Role::Citizen
                }
            )
            .is_err()
        );
        assert!(authorize(&steward, &Action::DepartmentCreate { name: &traffic }).is_err());
        let colleague = principal("ann", Role::Analyst, Some("transport"));
        let stranger = principal("tom", Role::Analyst, Some("traffic"));
        assert!(authorize(&steward, &Action::TokenManage { owner: &colleague }).is_ok());
        assert!(authorize(&steward, &Action::TokenManage { owner: &stranger }).is_err());
    }

    #[test]
    fn everyone_else_only_themselves() {
        let analyst = principal("ann", Role::Analyst, Some("transport"));
        let other = principal("bob", Role::Analyst, Some("transport"));
        assert!(authorize(&analyst, &Action::TokenManage { owner: &analyst }).is_ok());
        assert!(authorize(&analyst, &Action::TokenManage { owner: &other }).is_err());
        assert!(
            authorize(
                &analyst,
                &Action::AuditRead {
                    department: None,
                    principal: Some("ann")
                }
            )
            .is_ok()
        );
        assert!(
            authorize(
                &analyst,
                &Action::AuditRead {
                    department: Some("transport"),
                    principal: None
                }
            )
            .is_err()
        );
        assert!(authorize(&analyst, &Action::DepartmentRead).is_ok());
        let citizen = principal("c1", Role::Citizen, None);
        let name = n("x");
        assert!(
            authorize(
                &citizen,
                &Action::PrincipalCreate {
                    name: &name,
                    department: None,
                    role: Role::Citizen
                }
            )
            .is_err()
        );
    }

    #[test]
    fn datasets_belong_to_their_department_and_not_to_the_admin() {
        let steward = principal("sam", Role::Steward, Some("transport"));
        let analyst = principal("ann", Role::Analyst, Some("transport"));
        let stranger = principal("tom", Role::Analyst, Some("traffic"));
        let admin = principal("admin", Role::Admin, None);
        let citizen = principal("c1", Role::Citizen, None);
        let transport = n("transport");
        let write = Action::DatasetWrite {
            dataset: "transport.vehicles",
            department: &transport,
        };
        let query = Action::DatasetQuery {
            dataset: "transport.vehicles",
            department: "transport",
        };
        assert!(authorize(&steward, &write).is_ok());
        assert!(authorize(&analyst, &write).is_err());
        assert!(authorize(&admin, &write).is_ok());
        assert!(authorize(&steward, &query).is_ok() && authorize(&analyst, &query).is_ok());
        assert!(authorize(&stranger, &query).is_err());
        assert!(
            authorize(&admin, &query).is_err(),
            "the admin reads no department's data"
        );
        assert!(
            authorize(&citizen, &query).is_err()
                && authorize(&citizen, &Action::CatalogRead).is_err()
        );
        assert!(authorize(&stranger, &Action::CatalogRead).is_ok());
    }

    #[test]
    fn grants_are_requested_by_others_and_decided_by_the_owner() {
        let owner_steward = principal("sam", Role::Steward, Some("transport"));
        let owner_analyst = principal("ann", Role::Analyst, Some("transport"));
        let police_analyst = principal("tom", Role::Analyst, Some("police"));
        let police_steward = principal("pat", Role::Steward, Some("police"));
        let health = principal("hal", Role::Steward, Some("health"));
        let admin = principal("admin", Role::Admin, None);
        let citizen = principal("c1", Role::Citizen, None);
        let request = Action::GrantRequest {
            dataset: "transport.vehicles",
            owner: "transport",
        };
        assert!(authorize(&police_analyst, &request).is_ok());
        let e = authorize(&owner_analyst, &request).unwrap_err();
        assert!(e.hint.unwrap().contains("without a grant"));
        assert!(authorize(&admin, &request).is_err() && authorize(&citizen, &request).is_err());
        let decide = Action::GrantDecide {
            id: "g_1",
            owner: "transport",
        };
        assert!(authorize(&owner_steward, &decide).is_ok());
        for p in [&owner_analyst, &police_steward, &admin, &citizen] {
            assert!(authorize(p, &decide).is_err(), "{} may not decide", p.name);
        }
        let revoke = Action::GrantRevoke {
            id: "g_1",
            owner: "transport",
            grantee: "police",
        };
        for p in [&owner_steward, &police_steward, &admin] {
            assert!(authorize(p, &revoke).is_ok(), "{} may revoke", p.name);
        }
        for p in [&owner_analyst, &police_analyst, &health] {
            assert!(authorize(p, &revoke).is_err(), "{} may not revoke", p.name);
        }
        let use_ = Action::GrantUse {
            id: "g_1",
            grantee: "police",
        };
        assert!(authorize(&police_analyst, &use_).is_ok());
        for p in [&owner_analyst, &health, &admin, &citizen] {
            assert!(authorize(p, &use_).is_err(), "{} may not use", p.name);
        }
    }

    #[test]
    fn admin_may_do_anything() {
        let admin = principal("admin", Role::Admin, None);
        let t = n("traffic");
        assert!(authorize(&admin, &Action::DepartmentCreate { name: &t }).is_ok());
        assert!(
            authorize(
                &admin,
                &Action::AuditRead {
                    department: None,
                    principal: None
                }
            )
            .is_ok()
        );
    }
}
