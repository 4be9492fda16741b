//! Grants: a department asks for columns (and optionally rows) of another department's
//! dataset, for a purpose, until a date; the owner's steward approves or refuses; either side's
//! steward or the admin revokes; time expires it. Every step is authorised and audited (the
//! audit record carries the grant's purpose), and only then stored.
//!
//! Invariant: at most one grant per dataset and grantee department is active; approving a new
//! one supersedes the old, so a query never has to choose between grants.

use chrono::{DateTime, Utc};
use yunqi_store::IdentityChange;
use yunqi_types::{ColumnClass, Error, ErrorCode, Grant, GrantState, GrantStatus, Outcome};

use crate::{Action, Actor, CallContext, Governance, authorize, row_filter, tokens};

/// Longest purpose or reason text.
pub const GRANT_TEXT_CHARS_MAX: usize = 1000;

/// A request for a grant, as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRequest {
    /// `department.name` of the dataset.
    pub dataset: String,
    /// Columns wanted; `*` alone means every column.
    pub columns: Vec<String>,
    /// Optional row filter, a SQL condition over the dataset's columns.
    pub rows: Option<String>,
    /// Why (required).
    pub purpose: String,
    /// When it should end (required; at most `grant_days_max` ahead).
    pub until: DateTime<Utc>,
    /// Personal or sensitive columns wanted unmasked.
    pub unmasked: Vec<String>,
    /// Why unmasked values are needed (required with `unmasked`).
    pub unmasked_reason: Option<String>,
}

/// Which grants to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantFilter {
    /// Only grants in this state.
    pub state: Option<GrantState>,
    /// Only grants on this dataset (`department.name`).
    pub dataset: Option<String>,
}

fn text_field(what: &str, value: &str, flag: &str) -> Result<String, Error> {
    let v = value.trim();
    if v.is_empty() {
        return Err(
            Error::invalid(format!("a {what} is required")).hint(format!("say it with {flag}"))
        );
    }
    if v.chars().count() > GRANT_TEXT_CHARS_MAX {
        return Err(Error::invalid(format!(
            "the {what} is longer than {GRANT_TEXT_CHARS_MAX} characters"
        ))
        .hint("say it in fewer words"));
    }
    Ok(v.to_string())
}

impl Governance {
    fn grant_by_id(&self, id: &str) -> Result<Grant, Error> {
        self.read().grants.get(id).cloned().ok_or_else(|| {
            Error::not_found("grant", id).hint("list grants with `yunqi grant list`")
        })
    }

    fn grant_event(
        actor: &Actor,
        action: &str,
        grant: &Grant,
        outcome: Outcome,
        detail: String,
        ctx: &CallContext,
    ) -> yunqi_types::AuditEvent {
        let mut e = Self::actor_event(
            actor,
            action,
            format!("grant:{}", grant.id),
            outcome,
            detail,
            ctx,
        );
        e.purpose = grant.purpose.clone();
        e
    }

    /// Asks for a grant (stewards and analysts of a department other than the owner).
    pub async fn request_grant(
        &self,
        actor: &Actor,
        req: GrantRequest,
        ctx: &CallContext,
    ) -> Result<Grant, Error> {
        let (owner, name) = req.dataset.split_once('.').ok_or_else(|| {
            Error::invalid(format!("invalid dataset \"{}\"", req.dataset))
                .hint("name the dataset as DEPARTMENT.DATASET, e.g. transport.vehicles")
        })?;
        let manifest = self.datasets.get_current(owner, name)?;
        let dataset = manifest.sql_name();
        let action = Action::GrantRequest {
            dataset: &dataset,
            owner: &manifest.department,
        };
        self.authorize(actor, &action, ctx).await?;
        let grantee = actor
            .principal
            .department
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default();
        let _guard = self.lock_current().await?;
        let now = self.now();
        let checked = (|| {
            let mut wanted = Vec::new();
            if req.columns.len() == 1 && req.columns[0].trim() == "*" {
                wanted = manifest.columns.iter().map(|c| c.name.clone()).collect();
            } else {
                for raw in &req.columns {
                    let c = manifest.column(raw.trim()).ok_or_else(|| {
                        let e = Error::invalid(format!(
                            "dataset {dataset} has no column \"{}\"",
                            raw.trim()
                        ));
                        match yunqi_types::suggest::did_you_mean(
                            raw.trim(),
                            manifest.columns.iter().map(|c| c.name.as_str()),
                        ) {
                            Some(s) => e.hint(format!("did you mean \"{s}\"?")),
                            None => e.hint(format!(
                                "its columns are {}",
                                manifest
                                    .columns
                                    .iter()
                                    .map(|c| c.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )),
                        }
                    })?;
                    wanted.push(c.name.clone());
                }
            }
            if wanted.is_empty() {
                return Err(Error::invalid("no columns were asked for")
                    .hint("name them with --columns C1,C2 (or * for all)"));
            }
            // Keep the dataset's order, once each.
            let columns: Vec<String> = manifest
                .columns
                .iter()
                .filter(|c| wanted.contains(&c.name))
                .map(|c| c.name.clone())
                .collect();
            let purpose = text_field("purpose", &req.purpose, "--purpose TEXT")?;
            if req.until <= now {
                return Err(Error::invalid("the grant would end in the past")
                    .detail(format!(
                        "until {}, now {}",
                        req.until.to_rfc3339(),
                        now.to_rfc3339()
                    ))
                    .hint("give a date in the future with --until YYYY-MM-DD"));
            }
            let max = now + chrono::Duration::days(i64::from(self.limits.grant_days_max));
            if req.until > max {
                return Err(Error::limit(
                    "grant_days_max",
                    u64::from(self.limits.grant_days_max),
                    "the grant would run longer than grants may",
                )
                .detail(format!("until {}", req.until.to_rfc3339()))
                .hint(format!(
                    "ask until {} at the latest, and renew it then",
                    max.date_naive()
                )));
            }
            let mut unmasked = Vec::new();
            for raw in &req.unmasked {
                let c = manifest
                    .column(raw.trim())
                    .filter(|c| columns.contains(&c.name))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "column \"{}\" is asked unmasked but not asked for",
                            raw.trim()
                        ))
                        .hint("list it in --columns too")
                    })?;
                if c.class < ColumnClass::Personal {
                    return Err(Error::invalid(format!(
                        "column \"{}\" is {} and never masked",
                        c.name, c.class
                    ))
                    .hint("leave it out of --unmasked"));
                }
                if !unmasked.contains(&c.name) {
                    unmasked.push(c.name.clone());
                }
            }
            let unmasked_reason = if unmasked.is_empty() {
                None
            } else {
                Some(text_field(
                    "reason for unmasked values",
                    req.unmasked_reason.as_deref().unwrap_or(""),
                    "--unmasked-reason TEXT",
                )?)
            };
            let rows = req
                .rows
                .as_deref()
                .map(|r| row_filter::check(r, &manifest))
                .transpose()?;
            Ok(Grant {
                id: format!("g_{}", tokens::random_hex(6)?),
                dataset: dataset.clone(),
                owner: manifest.department.clone(),
                grantee: grantee.clone(),
                requested_by: actor.principal.name.to_string(),
                requested_at: now,
                columns,
                rows,
                purpose,
                expires_at: req.until,
                unmasked,
                unmasked_reason,
                status: GrantStatus::Pending,
                decided_by: None,
                decided_at: None,
                reason: None,
                revoked_by: None,
                revoked_at: None,
            })
        })();
        let grant = match checked {
            Ok(g) => g,
            Err(e) => return Err(self.fail(actor, &action, e, ctx).await),
        };
        let mut detail = format!(
            "department {grantee} asks for {dataset} ({}) until {}",
            grant.columns.join(", "),
            grant.expires_at.to_rfc3339()
        );
        if let Some(r) = &grant.rows {
            detail.push_str(&format!("; rows where {r}"));
        }
        if !grant.unmasked.is_empty() {
            detail.push_str(&format!("; unmasked {}", grant.unmasked.join(", ")));
        }
        let event = Self::grant_event(actor, "grant.request", &grant, Outcome::Ok, detail, ctx);
        self.commit(
            event,
            vec![IdentityChange::PutGrant(Box::new(grant.clone()))],
        )
        .await?;
        Ok(grant)
    }

    /// The grant a steward is about to approve or refuse, read again under the write lock
    /// (held until the guard is dropped) once the decision is authorised.
    async fn begin_decision(
        &self,
        actor: &Actor,
        id: &str,
        ctx: &CallContext,
    ) -> Result<(Grant, tokio::sync::MutexGuard<'_, ()>), Error> {
        // Caught up first: a grant requested on another node a moment ago is found.
        let guard = self.lock_current().await?;
        let owner = self.grant_by_id(id)?.owner;
        self.authorize(actor, &Action::GrantDecide { id, owner: &owner }, ctx)
            .await?;
        Ok((self.grant_by_id(id)?, guard))
    }

    /// Approves a pending request (a steward of the owning department). A grant the same
    /// department held on the same dataset is superseded.
    pub async fn approve_grant(
        &self,
        actor: &Actor,
        id: &str,
        ctx: &CallContext,
    ) -> Result<Grant, Error> {
        let (mut grant, _guard) = self.begin_decision(actor, id, ctx).await?;
        let owner = grant.owner.clone();
        let action = Action::GrantDecide { id, owner: &owner };
        let now = self.now();
        let checked = (|| {
            match grant.state(now) {
                GrantState::Pending => {}
                GrantState::Expired => {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!("grant request {id} has expired"),
                    )
                    .hint("the department asks again with a later --until"));
                }
                s => {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!("grant {id} is {s}, not pending"),
                    )
                    .hint("only pending requests are approved"));
                }
            }
            // The dataset may have changed since the request: check again.
            let (d, n) = grant.dataset.split_once('.').unwrap_or_default();
            let manifest = self.datasets.get_current(d, n)?;
            if let Some(r) = &grant.rows {
                row_filter::check(r, &manifest)?;
            }
            Ok(())
        })();
        if let Err(e) = checked {
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        grant.status = GrantStatus::Approved;
        grant.decided_by = Some(actor.principal.name.to_string());
        grant.decided_at = Some(now);
        let mut changes = Vec::new();
        let mut superseded = Vec::new();
        for old in self.read().grants.values() {
            if old.id != grant.id
                && old.dataset == grant.dataset
                && old.grantee == grant.grantee
                && old.status == GrantStatus::Approved
            {
                let mut old = old.clone();
                old.status = GrantStatus::Superseded;
                old.revoked_at = Some(now);
                old.reason = Some(format!("superseded by grant {}", grant.id));
                superseded.push(old.id.clone());
                changes.push(IdentityChange::PutGrant(Box::new(old)));
            }
        }
        changes.push(IdentityChange::PutGrant(Box::new(grant.clone())));
        let mut detail = format!(
            "{} may read {} ({}) until {}",
            grant.grantee,
            grant.dataset,
            grant.columns.join(", "),
            grant.expires_at.to_rfc3339()
        );
        if !superseded.is_empty() {
            detail.push_str(&format!("; supersedes {}", superseded.join(", ")));
        }
        let event = Self::grant_event(actor, "grant.approve", &grant, Outcome::Ok, detail, ctx);
        self.commit(event, changes).await?;
        Ok(grant)
    }

    /// Refuses a pending request, with a reason (a steward of the owning department).
    pub async fn refuse_grant(
        &self,
        actor: &Actor,
        id: &str,
        reason: &str,
        ctx: &CallContext,
    ) -> Result<Grant, Error> {
        let (mut grant, _guard) = self.begin_decision(actor, id, ctx).await?;
        let owner = grant.owner.clone();
        let action = Action::GrantDecide { id, owner: &owner };
        let now = self.now();
        let checked = (|| {
            let reason = text_field("reason", reason, "--reason TEXT")?;
            match grant.state(now) {
                GrantState::Pending | GrantState::Expired
                    if grant.status == GrantStatus::Pending =>
                {
                    Ok(reason)
                }
                s => Err(Error::new(
                    ErrorCode::Conflict,
                    format!("grant {id} is {s}, not pending"),
                )
                .hint("only pending requests are refused; revoke an active grant instead")),
            }
        })();
        let reason = match checked {
            Ok(r) => r,
            Err(e) => return Err(self.fail(actor, &action, e, ctx).await),
        };
        grant.status = GrantStatus::Refused;
        grant.decided_by = Some(actor.principal.name.to_string());
        grant.decided_at = Some(now);
        grant.reason = Some(reason.clone());
        let event = Self::grant_event(
            actor,
            "grant.refuse",
            &grant,
            Outcome::Ok,
            format!("refused: {reason}"),
            ctx,
        );
        self.commit(
            event,
            vec![IdentityChange::PutGrant(Box::new(grant.clone()))],
        )
        .await?;
        Ok(grant)
    }

    /// Revokes an approved grant: from the next query on, it is not used. Revoking a revoked
    /// grant succeeds and changes nothing.
    pub async fn revoke_grant(
        &self,
        actor: &Actor,
        id: &str,
        reason: Option<&str>,
        ctx: &CallContext,
    ) -> Result<Grant, Error> {
        let grant = self.lookup(|g| g.grant_by_id(id)).await?;
        let action = Action::GrantRevoke {
            id,
            owner: &grant.owner,
            grantee: &grant.grantee,
        };
        self.authorize(actor, &action, ctx).await?;
        let _guard = self.lock_current().await?;
        let mut grant = self.grant_by_id(id)?;
        if grant.status == GrantStatus::Revoked {
            return Ok(grant);
        }
        if grant.status != GrantStatus::Approved {
            let e = Error::new(
                ErrorCode::Conflict,
                format!("grant {id} is {}, not approved", grant.state(self.now())),
            )
            .hint("only approved grants are revoked; refuse a pending request instead");
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        let reason = match reason.map(|r| text_field("reason", r, "--reason TEXT")) {
            Some(Err(e)) => return Err(self.fail(actor, &action, e, ctx).await),
            Some(Ok(r)) => Some(r),
            None => None,
        };
        let now = self.now();
        grant.status = GrantStatus::Revoked;
        grant.revoked_by = Some(actor.principal.name.to_string());
        grant.revoked_at = Some(now);
        grant.reason = reason.clone();
        let event = Self::grant_event(
            actor,
            "grant.revoke",
            &grant,
            Outcome::Ok,
            match reason {
                Some(r) => format!("revoked: {r}"),
                None => "revoked".into(),
            },
            ctx,
        );
        self.commit(
            event,
            vec![IdentityChange::PutGrant(Box::new(grant.clone()))],
        )
        .await?;
        Ok(grant)
    }

    /// The grants and requests `actor` may see (the admin all; staff those of their
    /// department, as owner or grantee), oldest first.
    pub fn list_grants(&self, actor: &Actor, filter: &GrantFilter) -> Result<Vec<Grant>, Error> {
        let now = self.now();
        Ok(self
            .read()
            .grants
            .values()
            .filter(|g| {
                authorize(
                    &actor.principal,
                    &Action::GrantRead {
                        id: &g.id,
                        owner: &g.owner,
                        grantee: &g.grantee,
                    },
                )
                .is_ok()
            })
            .filter(|g| filter.state.is_none_or(|s| g.state(now) == s))
            .filter(|g| filter.dataset.as_ref().is_none_or(|d| &g.dataset == d))
            .cloned()
            .collect::<Vec<_>>())
        .map(|mut v: Vec<Grant>| {
            v.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
            v
        })
    }

    /// One grant.
    pub async fn get_grant(
        &self,
        actor: &Actor,
        id: &str,
        ctx: &CallContext,
    ) -> Result<Grant, Error> {
        let grant = self.grant_by_id(id)?;
        self.authorize(
            actor,
            &Action::GrantRead {
                id,
                owner: &grant.owner,
                grantee: &grant.grantee,
            },
            ctx,
        )
        .await?;
        Ok(grant)
    }

    /// The grant `id` if it is still in force for `actor` now (a query planned under it checks
    /// again before it runs).
    pub fn grant_in_force(&self, actor: &Actor, id: &str) -> Result<Grant, Error> {
        let grant = self.grant_by_id(id)?;
        authorize(
            &actor.principal,
            &Action::GrantUse {
                id,
                grantee: &grant.grantee,
            },
        )?;
        let state = grant.state(self.now());
        if state != GrantState::Active {
            return Err(
                Error::denied(format!("grant {id} on {} is {state}", grant.dataset)).hint(format!(
                    "ask department \"{}\" for a new grant (`yunqi grant request {} …`)",
                    grant.owner, grant.dataset
                )),
            );
        }
        Ok(grant)
    }

    /// The active grant department `grantee` holds on `dataset`, if any.
    pub(crate) fn active_grant(&self, dataset: &str, grantee: &str) -> Option<Grant> {
        let now = self.now();
        self.read()
            .grants
            .values()
            .find(|g| g.dataset == dataset && g.grantee == grantee && g.is_active(now))
            .cloned()
    }
}
