// OAuth2/OIDC provider for mailbridge's integration tests, built on
// oauth2-mock-server (discovery, JWKS, /authorize, /userinfo, RS256 signing).
// Started by start.sh next to this file, whose header lists the files this
// writes and the control endpoints.
//
// The mock's own /token accepts any code and any refresh token, checks PKCE
// only when the client happens to send a code_verifier, answers errors as
// application/problem+json and always issues 3600 s tokens. The tests need a
// provider that remembers who a code or refresh token belongs to and can
// refuse, so /token is ours; the mock's is moved out of the way.
import { createHash, createPublicKey, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { chownSync, mkdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';

const RT = process.env.MAILSTACK_RUNTIME || join(process.env.TMPDIR || '/tmp', 'mailbridge-mailstack');
const PORT = Number(process.env.OAUTH_TEST_PORT || 0);
const DEFAULT_LIFETIME = 3600;
const CODE_LIFETIME_MS = 10 * 60 * 1000;
const CONTROL = '/__control';

const log = (...args) => console.log(new Date().toISOString(), ...args);
const nowSecs = () => Math.floor(Date.now() / 1000);
const opaque = (prefix) => prefix + randomBytes(32).toString('base64url');
const short = (s) => (typeof s === 'string' && s.length > 16 ? `${s.slice(0, 12)}…` : s);

// ------------------------------------------------------------------ state --
const lifetimes = new Map(); // email -> access token lifetime (s)
const codes = new Map(); // code -> { email, clientId, redirectUri, challenge, scope, nonce, expires, used }
const refreshTokens = new Map(); // token -> { email, clientId, scope, revoked }
const accessTokens = new Map(); // token -> { email, exp }
const failures = new Map(); // email -> { status, count }
const stats = new Map(); // email -> { code_exchanges, refreshes, failed }

const statsOf = (email) => {
  if (!stats.has(email)) stats.set(email, { code_exchanges: 0, refreshes: 0, failed: 0 });
  return stats.get(email);
};

// ----------------------------------------------------------------- issuer --
const issuer = new OAuth2Issuer();
// A fresh kid per start: Dovecot caches a validation key by kid for the life
// of its auth process, so reusing a kid with a new key would break logins.
const jwk = await issuer.keys.generate('RS256');
const service = new OAuth2Service(issuer, { token: '/__mock/token' });

async function sign(lifetime, claims) {
  let exp;
  const jwt = await issuer.buildToken({
    scopesOrTransform: (_header, payload) => {
      const iat = payload.iat;
      exp = iat + lifetime;
      // Dovecot refuses an iat/nbf even milliseconds in the future (it reads
      // the kernel's coarse clock), so both are backdated a minute.
      // No `azp` claim: Dovecot would look the key up under keys/<azp>/.
      Object.assign(payload, claims, { iat: iat - 60, nbf: iat - 60, exp });
    },
  });
  return { jwt, exp };
}

async function issueAccess(email, scope, lifetime = lifetimes.get(email) ?? DEFAULT_LIFETIME) {
  const { jwt, exp } = await sign(lifetime, { sub: email, email, ...(scope && { scope }) });
  accessTokens.set(jwt, { email, exp });
  return { access_token: jwt, token_type: 'Bearer', expires_in: lifetime, ...(scope && { scope }), exp };
}

function issueRefresh(email, clientId, scope) {
  const token = opaque('rt-');
  refreshTokens.set(token, { email, clientId, scope, revoked: false });
  return token;
}

// ------------------------------------------------------------------- http --
function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(text);
}

const oauthError = (res, status, error, description) =>
  sendJson(res, status, description ? { error, error_description: description } : { error });

// RFC 6749 2.3.1: client_secret_basic form-encodes id and secret first.
function clientOf(req, body) {
  const m = /^Basic\s+(\S+)$/i.exec(req.headers.authorization ?? '');
  if (m) {
    const text = Buffer.from(m[1], 'base64').toString('utf8');
    const i = text.indexOf(':');
    const dec = (s) => {
      try {
        return decodeURIComponent(s.replace(/\+/g, ' '));
      } catch {
        return s;
      }
    };
    if (i > 0) return { id: dec(text.slice(0, i)), secret: dec(text.slice(i + 1)) };
  }
  return { id: body.client_id, secret: body.client_secret };
}

const pkceS256 = (verifier) => createHash('sha256').update(verifier).digest('base64url');

service.addRoute('POST', '/token', async (req, res) => {
  const body = req.body ?? {};
  const grant = body.grant_type;
  let email;
  if (grant === 'authorization_code') email = codes.get(body.code)?.email;
  else if (grant === 'refresh_token') email = refreshTokens.get(body.refresh_token)?.email;
  else return oauthError(res, 400, 'unsupported_grant_type', `grant_type ${grant} is not supported`);

  const counts = email ? statsOf(email) : undefined;
  if (counts) counts[grant === 'authorization_code' ? 'code_exchanges' : 'refreshes']++;
  const refuse = (status, error, description) => {
    if (counts) counts.failed++;
    log(`token ${grant} for ${email ?? '?'} refused: ${status} ${error} ${description ?? ''}`);
    return oauthError(res, status, error, description);
  };

  // Before anything is consumed, so the client can retry with the same code.
  const injected = email && failures.get(email);
  if (injected && injected.count > 0) {
    injected.count--;
    return refuse(injected.status, 'temporarily_unavailable', 'injected by the test');
  }
  const client = clientOf(req, body);
  // The secret is optional (public clients) and its value is not checked.
  if (!client.id) return refuse(401, 'invalid_client', 'client_id required (body or basic auth)');

  if (grant === 'refresh_token') {
    const entry = refreshTokens.get(body.refresh_token);
    if (!entry || entry.revoked) return refuse(400, 'invalid_grant', 'Token has been expired or revoked.');
    if (entry.clientId && entry.clientId !== client.id) return refuse(400, 'invalid_grant', 'Unauthorized client.');
    const { exp: _exp, ...answer } = await issueAccess(entry.email, entry.scope);
    log(`token refresh_token for ${email}: ok, ${answer.expires_in} s`);
    return sendJson(res, 200, answer);
  }

  // A used code stays known so that a replay still counts for its email.
  const code = codes.get(body.code);
  if (!code || code.used || code.expires < Date.now()) return refuse(400, 'invalid_grant', 'Malformed auth code.');
  code.used = true;
  if (code.clientId !== client.id) return refuse(400, 'invalid_grant', 'client_id differs from the authorize request');
  if (code.redirectUri !== body.redirect_uri) return refuse(400, 'invalid_grant', 'redirect_uri differs from the authorize request');
  const verifier = body.code_verifier;
  if (typeof verifier !== 'string') return refuse(400, 'invalid_grant', 'Missing code verifier.');
  if (!/^[A-Za-z0-9._~-]{43,128}$/.test(verifier) || pkceS256(verifier) !== code.challenge) {
    return refuse(400, 'invalid_grant', 'Invalid code verifier.');
  }
  const { exp: _exp, ...answer } = await issueAccess(code.email, code.scope);
  const idClaims = { sub: code.email, email: code.email, email_verified: true, aud: client.id };
  if (code.nonce) idClaims.nonce = code.nonce;
  answer.id_token = (await sign(answer.expires_in, idClaims)).jwt;
  answer.refresh_token = issueRefresh(code.email, client.id, code.scope);
  log(`token authorization_code for ${email}: ok, ${answer.expires_in} s, refresh ${short(answer.refresh_token)}`);
  return sendJson(res, 200, answer);
});

// The mock sends the redirect for the URL object it passes here, so this
// edits it in place (assigning a new URL to `url` would be ignored).
service.on('beforeAuthorizeRedirect', ({ url }, req) => {
  const q = req.query;
  const code = url.searchParams.get('code');
  if (!code) return; // the mock already answered unsupported_response_type
  const deny = (error, description) => {
    url.searchParams.delete('code');
    url.searchParams.set('error', error);
    if (description) url.searchParams.set('error_description', description);
    log(`authorize for ${q.mock_email ?? '?'}: ${error} ${description ?? ''}`);
  };
  if (q.mock_deny === '1') return deny('access_denied');
  const email = typeof q.mock_email === 'string' ? q.mock_email.trim().toLowerCase() : '';
  if (!email) return deny('invalid_request', 'mock_email missing: the test says who logs in');
  if (typeof q.client_id !== 'string' || !q.client_id) return deny('invalid_request', 'client_id missing');
  if (q.code_challenge_method !== 'S256' || typeof q.code_challenge !== 'string') {
    return deny('invalid_request', 'PKCE required: code_challenge with code_challenge_method=S256');
  }
  codes.set(code, {
    email,
    clientId: q.client_id,
    redirectUri: q.redirect_uri,
    challenge: q.code_challenge,
    scope: typeof q.scope === 'string' ? q.scope : '',
    nonce: typeof q.nonce === 'string' ? q.nonce : undefined,
    expires: Date.now() + CODE_LIFETIME_MS,
  });
  log(`authorize for ${email}: code ${short(code)}`);
});

service.on('beforeUserinfo', (response, req) => {
  const token = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '')?.[1];
  const entry = token && accessTokens.get(token);
  if (!entry || entry.exp <= nowSecs()) {
    response.statusCode = 401;
    response.body = { error: 'invalid_token', error_description: 'Invalid Credentials' };
    return;
  }
  response.body = { sub: entry.email, email: entry.email, email_verified: true };
});

service.on('beforeWellKnownOpenIdConfiguration', (response) => {
  Object.assign(response.body, {
    token_endpoint: `${issuer.url}/token`,
    grant_types_supported: ['authorization_code', 'refresh_token'],
    token_endpoint_auth_methods_supported: ['client_secret_post', 'client_secret_basic'],
    code_challenge_methods_supported: ['S256'],
  });
});

// --------------------------------------------------------------- control --
class BadRequest extends Error {}

function control(method, path, handler) {
  service.addRoute(method, CONTROL + path, async (req, res) => {
    try {
      const args = method === 'GET' ? req.query : req.body;
      if (!args || typeof args !== 'object') throw new BadRequest('JSON object body expected');
      const email = typeof args.email === 'string' ? args.email.trim().toLowerCase() : '';
      if (!email) throw new BadRequest('email missing');
      const answer = await handler(email, args);
      log(`control ${path} ${JSON.stringify(args)}`);
      sendJson(res, 200, answer ?? {});
    } catch (e) {
      if (!(e instanceof BadRequest)) throw e;
      sendJson(res, 400, { error: e.message });
    }
  });
}

function int(args, name, { min = -Infinity, max = Infinity, fallback } = {}) {
  const v = args[name] ?? fallback;
  if (!Number.isInteger(v) || v < min || v > max) throw new BadRequest(`${name} must be an integer in [${min}, ${max}]`);
  return v;
}

control('POST', '/lifetime', (email, args) => {
  lifetimes.set(email, int(args, 'seconds'));
});

control('POST', '/revoke', (email) => {
  let revoked = 0;
  for (const entry of refreshTokens.values()) {
    if (entry.email === email && !entry.revoked) {
      entry.revoked = true;
      revoked++;
    }
  }
  return { revoked };
});

control('POST', '/fail', (email, args) => {
  failures.set(email, { status: int(args, 'status', { min: 400, max: 599 }), count: int(args, 'count', { min: 0 }) });
});

// What a CRM running its own consent screen hands over.
control('POST', '/grant', async (email, args) => {
  const scope = 'openid email https://mail.google.com/';
  const lifetime = int(args, 'seconds', { fallback: lifetimes.get(email) ?? DEFAULT_LIFETIME });
  const { access_token, expires_in, exp } = await issueAccess(email, scope, lifetime);
  const expires_at = new Date(exp * 1000).toISOString().replace('.000Z', 'Z');
  return { refresh_token: issueRefresh(email, null, scope), access_token, expires_in, expires_at };
});

control('GET', '/stats', (email) => ({ code_exchanges: 0, refreshes: 0, failed: 0, ...stats.get(email) }));

// ----------------------------------------------------------------- start --
const server = createServer((req, res) => {
  res.on('finish', () => log(`${req.method} ${req.url.split('?')[0]} -> ${res.statusCode}`));
  service.requestHandler(req, res);
});
await new Promise((resolve, reject) => server.once('error', reject).listen(PORT, '127.0.0.1', resolve));
const port = server.address().port;
// 127.0.0.1 rather than the mock's default "localhost", which a client may
// resolve to ::1 first, where nothing listens.
issuer.url = `http://127.0.0.1:${port}`;

const keyDir = join(RT, 'oauth2', 'keys', 'default', 'RS256');
const keyFile = join(keyDir, jwk.kid);
mkdirSync(keyDir, { recursive: true, mode: 0o755 });
const pem = createPublicKey({ key: jwk, format: 'jwk' }).export({ type: 'spki', format: 'pem' });
writeFileSync(keyFile, pem, { mode: 0o644 });
try {
  // Dovecot's auth process (user dovecot) reads the key; match the dir's owner.
  const { uid, gid } = statSync(keyDir);
  chownSync(keyFile, uid, gid);
} catch {
  // not root: mode 0644 is enough to read it
}

const envFile = join(RT, 'oauth.env');
const pidFile = join(RT, 'oauth.pid');
writeFileSync(pidFile, `${process.pid}\n`);
// oauth.env last and atomically: start.sh takes its existence as "ready".
writeFileSync(`${envFile}.tmp`, [
  `OAUTH_ISSUER=${issuer.url}`,
  `OAUTH_CONTROL=${issuer.url}${CONTROL}`,
  `OAUTH_KID=${jwk.kid}`,
  `OAUTH_KEY_FILE=${keyFile}`,
  '',
].join('\n'));
renameSync(`${envFile}.tmp`, envFile);
log(`listening on ${issuer.url}, kid ${jwk.kid}, key ${keyFile}`);

function shutdown(signal) {
  log(`${signal}: stopping`);
  for (const f of [envFile, pidFile, keyFile]) rmSync(f, { force: true });
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
