//! The PostgreSQL wire protocol endpoint. `psql`, JDBC, psycopg and BI tools log in with the
//! principal's name as user, its token as password (cleartext, so put TLS in front when the
//! endpoint leaves the machine), and database `yunqi`; queries run through the governed SQL
//! engine (`yunqi-sql`), so they see exactly what the HTTP API would show the same principal.
//!
//! API boundary: this crate knows the wire protocol and SQLSTATEs; it decides nothing. Logins
//! and their refusals are audited (`auth.login`), and every query by the engine.
#![deny(missing_docs)]

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use futures::{Sink, SinkExt, stream};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, METADATA_DATABASE, METADATA_USER, PgWireConnectionState,
    PgWireServerHandlers, PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use yunqi_governance::{Actor, CallContext, Governance};
use yunqi_sql::{Planned, SqlEngine, StatementKind};
use yunqi_types::{Error, ErrorCode, Outcome};

/// The only database name.
pub const DATABASE: &str = "yunqi";

/// The SQLSTATE of an error.
pub fn sqlstate(e: &Error) -> &'static str {
    match e.code {
        ErrorCode::InvalidInput if e.message.starts_with("syntax error") => "42601",
        ErrorCode::InvalidInput => "22023",
        ErrorCode::Unauthenticated => "28000",
        ErrorCode::PermissionDenied => "42501",
        ErrorCode::NotFound if e.message.starts_with("table") => "42P01",
        ErrorCode::NotFound => "42704",
        ErrorCode::AlreadyExists => "42710",
        ErrorCode::Conflict => "40001",
        ErrorCode::LimitExceeded => "54000",
        ErrorCode::Unavailable => "57P03",
        ErrorCode::Internal => "XX000",
    }
}

fn error_info(severity: &str, code: &str, e: &Error) -> ErrorInfo {
    let mut info = ErrorInfo::new(severity.to_string(), code.to_string(), e.message.clone());
    info.detail = e.detail.clone();
    info.hint = e.hint.clone();
    info
}

fn to_pg(e: &Error) -> PgWireError {
    PgWireError::UserError(Box::new(error_info("ERROR", sqlstate(e), e)))
}

fn fatal(code: &str, e: &Error) -> PgWireError {
    PgWireError::UserError(Box::new(error_info("FATAL", code, e)))
}

/// Shared by the handlers of every connection.
pub struct PgServer {
    gov: Arc<Governance>,
    engine: Arc<SqlEngine>,
    sense: Arc<yunqi_sense::Sense>,
    params: DefaultServerParameterProvider,
    pid: RandomPidSecretKeyGenerator,
    requests: AtomicU64,
}

impl PgServer {
    /// A server over governance, the SQL engine and the streams (for `CREATE STREAM` and
    /// `CREATE CONTINUOUS VIEW`).
    pub fn new(
        gov: Arc<Governance>,
        engine: Arc<SqlEngine>,
        sense: Arc<yunqi_sense::Sense>,
    ) -> Arc<PgServer> {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = "16.0 (yunqi)".to_string();
        Arc::new(PgServer {
            gov,
            engine,
            sense,
            params,
            pid: RandomPidSecretKeyGenerator::default(),
            requests: AtomicU64::new(0),
        })
    }

    fn call(&self, client: &impl ClientInfo) -> CallContext {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        CallContext {
            request_id: format!("pg-{}-{n}", client.pid_and_secret_key().0),
        }
    }

    async fn login(
        &self,
        user: &str,
        database: &str,
        token: &str,
        call: &CallContext,
    ) -> Result<Actor, PgWireError> {
        let refuse = async |error: Error, principal_name: Option<&str>, code: &str| {
            let principal = principal_name.and_then(|n| self.gov.principal_named(n));
            let _ = self
                .gov
                .record_denial(principal.as_ref(), "auth.login", "pg", &error, call)
                .await;
            fatal(code, &error)
        };
        let actor = match self.gov.authenticate_current(token).await {
            Ok(actor) => actor,
            Err((error, owner)) => {
                let shown = Error::unauthenticated(format!(
                    "password authentication failed for user \"{user}\""
                ))
                .detail(error.message.clone())
                .hint("the password is the principal's yunqi token");
                return Err(refuse(shown, owner.as_ref().map(|n| n.as_str()), "28P01").await);
            }
        };
        if actor.principal.name.as_str() != user {
            let e = Error::unauthenticated(format!(
                "password authentication failed for user \"{user}\""
            ))
            .detail("the token belongs to another principal")
            .hint("log in with the name of the principal the token was created for");
            return Err(refuse(e, Some(actor.principal.name.as_str()), "28P01").await);
        }
        if database != DATABASE {
            let e = Error::not_found("database", database)
                .hint(format!("connect to database \"{DATABASE}\""));
            return Err(refuse(e, Some(user), "3D000").await);
        }
        self.gov
            .record_access(&actor, "auth.login", "pg", Outcome::Ok, String::new(), call)
            .await
            .map_err(|e| fatal("57P03", &e))?;
        Ok(actor)
    }
}

fn actor_of<C: ClientInfo + ?Sized>(client: &C) -> PgWireResult<Arc<Actor>> {
    client
        .session_extensions()
        .get::<Actor>()
        .ok_or_else(|| fatal("28000", &Error::unauthenticated("not logged in")))
}

impl PgServer {
    /// The session's actor as of this statement: a token revoked (on any node) since the login
    /// ends what the session may do, and a fenced-off node serves no statement.
    fn current_actor<C: ClientInfo + ?Sized>(&self, client: &C) -> PgWireResult<Arc<Actor>> {
        let actor = actor_of(client)?;
        match self.gov.revalidate(&actor) {
            Ok(now) if now == *actor => Ok(actor),
            Ok(now) => Ok(Arc::new(now)),
            Err(e) => Err(fatal(sqlstate(&e), &e)),
        }
    }
}

#[async_trait]
impl StartupHandler for PgServer {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if client.metadata().get(METADATA_USER).is_none() {
                    return Err(PgWireError::UserNameRequired);
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
                Ok(())
            }
            PgWireFrontendMessage::PasswordMessageFamily(password) => {
                let token = password.into_password()?.password;
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .unwrap_or_default();
                let database = client
                    .metadata()
                    .get(METADATA_DATABASE)
                    .cloned()
                    .unwrap_or_else(|| user.clone());
                let call = self.call(client);
                let actor = self.login(&user, &database, &token, &call).await?;
                client.session_extensions().insert(actor);
                let (pid, key) = self.pid.generate(client);
                client.set_pid_and_secret_key(pid, key);
                finish_authentication(client, &self.params).await
            }
            _ => Ok(()),
        }
    }
}

/// Runs a planned query and encodes its rows.
async fn run(
    server: &PgServer,
    actor: &Actor,
    planned: &Planned,
    params: Vec<ScalarValue>,
    format: &Format,
    call: &CallContext,
) -> PgWireResult<Response> {
    let result = match server
        .engine
        .execute(actor, planned, params, None, call)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Ok(Response::Error(Box::new(error_info(
                "ERROR",
                sqlstate(&e),
                &e,
            ))));
        }
    };
    let fields = Arc::new(arrow_schema_to_pg_fields(&result.schema, format, None)?);
    let mut rows = Vec::new();
    for batch in result.batches {
        rows.extend(encode_recordbatch(fields.clone(), batch));
    }
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(rows),
    )))
}

fn session_response(kind: &StatementKind) -> Option<Response> {
    match kind {
        StatementKind::Query(_) => None,
        StatementKind::Session(tag) => Some(Response::Execution(Tag::new(tag))),
        StatementKind::Begin => Some(Response::TransactionStart(Tag::new("BEGIN"))),
        StatementKind::End(tag) => Some(Response::TransactionEnd(Tag::new(tag))),
    }
}

#[async_trait]
impl SimpleQueryHandler for PgServer {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let actor = self.current_actor(client)?;
        let call = self.call(client);
        let ddl = query.trim().trim_end_matches(';');
        if let Some(kind) = yunqi_sense::ddl_kind(ddl) {
            let tag = match kind {
                yunqi_sense::DdlKind::CreateStream => "CREATE STREAM",
                yunqi_sense::DdlKind::CreateContinuousView => "CREATE CONTINUOUS VIEW",
            };
            return Ok(vec![
                match self.sense.execute_ddl(&actor, ddl, &call).await {
                    Ok(_) => Response::Execution(Tag::new(tag)),
                    Err(e) => Response::Error(Box::new(error_info("ERROR", sqlstate(&e), &e))),
                },
            ]);
        }
        let statements = match self.engine.split(query) {
            Ok(s) => s,
            Err(e) => {
                return Ok(vec![Response::Error(Box::new(error_info(
                    "ERROR",
                    sqlstate(&e),
                    &e,
                )))]);
            }
        };
        let mut out = Vec::new();
        for kind in statements {
            if let Some(r) = session_response(&kind) {
                out.push(r);
                continue;
            }
            let StatementKind::Query(sql) = kind else {
                continue;
            };
            let response = match self.engine.plan(&actor, &sql, &call).await {
                Ok(planned) => {
                    run(
                        self,
                        &actor,
                        &planned,
                        Vec::new(),
                        &Format::UnifiedText,
                        &call,
                    )
                    .await?
                }
                Err(e) => Response::Error(Box::new(error_info("ERROR", sqlstate(&e), &e))),
            };
            let failed = matches!(response, Response::Error(_));
            out.push(response);
            if failed {
                break;
            }
        }
        Ok(out)
    }
}

/// A statement of the extended protocol: a planned query, or a session statement.
#[derive(Debug, Clone)]
pub enum PgStatement {
    /// A query.
    Query(Box<Planned>),
    /// SET, BEGIN, COMMIT and the like.
    Session(StatementKind),
}

/// Plans statements of the extended protocol in the caller's session.
pub struct Parser {
    server: Arc<PgServer>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = PgStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<PgStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let actor = self.server.current_actor(client)?;
        let statements = self.server.engine.split(sql).map_err(|e| to_pg(&e))?;
        let kind = match statements.as_slice() {
            [] => return Ok(None),
            [one] => one.clone(),
            _ => {
                return Err(to_pg(
                    &Error::invalid("a prepared statement holds one statement")
                        .hint("prepare each statement on its own"),
                ));
            }
        };
        match kind {
            StatementKind::Query(q) => {
                let call = self.server.call(client);
                let planned = self
                    .server
                    .engine
                    .plan(&actor, &q, &call)
                    .await
                    .map_err(|e| to_pg(&e))?;
                Ok(Some(PgStatement::Query(Box::new(planned))))
            }
            other => Ok(Some(PgStatement::Session(other))),
        }
    }

    fn get_parameter_types(&self, stmt: &PgStatement) -> PgWireResult<Vec<Type>> {
        match stmt {
            PgStatement::Query(p) => p
                .parameter_types()
                .map_err(|e| to_pg(&e))?
                .iter()
                .map(|t| t.as_ref().map_or(Ok(Type::UNKNOWN), into_pg_type))
                .collect(),
            PgStatement::Session(_) => Ok(Vec::new()),
        }
    }

    fn get_result_schema(
        &self,
        stmt: &PgStatement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match stmt {
            PgStatement::Query(p) => {
                arrow_schema_to_pg_fields(&p.schema(), format.unwrap_or(&Format::UnifiedText), None)
            }
            PgStatement::Session(_) => Ok(Vec::new()),
        }
    }
}

/// Reads parameter `i` as the type the plan expects (text or binary, as the client sent it).
fn parameter(
    portal: &Portal<PgStatement>,
    i: usize,
    expected: Option<&DataType>,
) -> PgWireResult<ScalarValue> {
    let declared = portal.statement.parameter_types.get(i).cloned().flatten();
    let target = expected.cloned().unwrap_or(DataType::Utf8);
    let pg_type = declared
        .filter(|t| *t != Type::UNKNOWN)
        .unwrap_or_else(|| into_pg_type(&target).unwrap_or(Type::TEXT));
    let value = match pg_type {
        Type::BOOL => ScalarValue::Boolean(portal.parameter::<bool>(i, &pg_type)?),
        Type::INT2 => ScalarValue::Int16(portal.parameter::<i16>(i, &pg_type)?),
        Type::INT4 => ScalarValue::Int32(portal.parameter::<i32>(i, &pg_type)?),
        Type::INT8 => ScalarValue::Int64(portal.parameter::<i64>(i, &pg_type)?),
        Type::FLOAT4 => ScalarValue::Float32(portal.parameter::<f32>(i, &pg_type)?),
        Type::FLOAT8 => ScalarValue::Float64(portal.parameter::<f64>(i, &pg_type)?),
        _ => ScalarValue::Utf8(
            portal.parameters[i]
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        ),
    };
    value.cast_to(&target).map_err(|e| {
        to_pg(
            &Error::invalid(format!("parameter ${} cannot be read as {target}", i + 1))
                .detail(e.strip_backtrace()),
        )
    })
}

/// The extended-protocol handler: the server plus its parser.
pub struct Extended {
    server: Arc<PgServer>,
    parser: Arc<Parser>,
}

#[async_trait]
impl ExtendedQueryHandler for Extended {
    type Statement = PgStatement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<PgStatement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let actor = self.server.current_actor(client)?;
        match &portal.statement.statement {
            PgStatement::Session(kind) => {
                Ok(session_response(kind).unwrap_or(Response::EmptyQuery))
            }
            PgStatement::Query(planned) => {
                let types = planned.parameter_types().map_err(|e| to_pg(&e))?;
                let params = (0..portal.parameter_len())
                    .map(|i| parameter(portal, i, types.get(i).and_then(Option::as_ref)))
                    .collect::<PgWireResult<Vec<_>>>()?;
                let call = self.server.call(client);
                run(
                    &self.server,
                    &actor,
                    planned,
                    params,
                    &portal.result_column_format,
                    &call,
                )
                .await
            }
        }
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        stmt: &StoredStatement<PgStatement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let inferred = self.parser.get_parameter_types(&stmt.statement)?;
        let params = inferred
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                stmt.parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .filter(|d| *d != Type::UNKNOWN)
                    .unwrap_or(t)
            })
            .collect();
        let fields = self.parser.get_result_schema(&stmt.statement, None)?;
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        portal: &Portal<PgStatement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let fields = self.parser.get_result_schema(
            &portal.statement.statement,
            Some(&portal.result_column_format),
        )?;
        Ok(DescribePortalResponse::new(fields))
    }
}

/// The handlers pgwire asks for, per connection.
pub struct PgHandlers {
    server: Arc<PgServer>,
    extended: Arc<Extended>,
}

impl PgWireServerHandlers for PgHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.server.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.extended.clone()
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.server.clone()
    }
}

/// Accepts connections on `listener` until `shutdown` resolves, at most
/// `pg_connections_max` at once (more are refused with SQLSTATE 53300).
/// A TLS acceptor from a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or
/// SEC1). Clients then connect with `sslmode=require` (or `verify-full` with the CA).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<pgwire::tokio::TlsAcceptor, Error> {
    use pgwire::tokio::tokio_rustls::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        Error::invalid(format!("cannot read the TLS {what} {}", path.display()))
            .detail(e.to_string())
            .hint("give PEM files: --pg-tls-cert CHAIN.pem --pg-tls-key KEY.pem")
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("certificate", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("certificate", cert, &e))?;
    if chain.is_empty() {
        return Err(bad("certificate", cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("key", key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS set-up: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad("certificate and key", cert, &e))?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(pgwire::tokio::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts PostgreSQL connections until `shutdown`, with TLS offered when `tls` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<PgServer>,
    tls: Option<pgwire::tokio::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let handlers = Arc::new(PgHandlers {
        extended: Arc::new(Extended {
            server: server.clone(),
            parser: Arc::new(Parser {
                server: server.clone(),
            }),
        }),
        server: server.clone(),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(
        server.engine.limits().pg_connections_max,
    ));
    tokio::pin!(shutdown);
    loop {
        let (socket, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "pg accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "pg connection refused: pg_connections_max reached");
            drop(socket);
            continue;
        };
        let handlers = handlers.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                tracing::debug!(%peer, error = %e, "pg connection ended with an error");
            }
            drop(permit);
        });
    }
}
