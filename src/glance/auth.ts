/**
 * Where Glance is and how to authenticate to it, from flags and the standard OpenStack
 * environment (the variables `openstack` and `glance` read):
 *
 *   endpoint  --glance URL, else $CLOUDLET_GLANCE_URL, else $OS_IMAGE_URL, else the keystone
 *             catalog's `image` service (interface $OS_INTERFACE or public, $OS_REGION_NAME)
 *   token     $OS_TOKEN / $OS_AUTH_TOKEN as given; or keystone v3 password auth
 *             (POST $OS_AUTH_URL/v3/auth/tokens: $OS_USERNAME or $OS_USER_ID, $OS_PASSWORD,
 *             project $OS_PROJECT_NAME or $OS_PROJECT_ID (or $OS_TENANT_NAME), domains
 *             $OS_USER_DOMAIN_NAME / $OS_PROJECT_DOMAIN_NAME (or *_ID), default "Default");
 *             the token is the X-Subject-Token answer header
 *   none      a standalone Glance without keystone (paste flavor without authtoken)
 *
 * A token from the environment plus $OS_AUTH_URL but no endpoint: the token is exchanged for a
 * scoped one (method "token") to read the catalog.
 */
import { NetworkError, UsageError } from '../util/errors.js';

export interface GlanceSession {
  /** Base URL of the image API, without /v2 (e.g. http://controller:9292). */
  endpoint: string;
  /** Keystone token sent as X-Auth-Token; undefined for a Glance without keystone. */
  token?: string;
  /** How the session was made, for messages: "standalone", "token", "keystone password", … */
  auth: string;
}

export interface SessionOptions {
  /** --glance URL (wins over everything else). */
  endpoint?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
}

interface CatalogEndpoint {
  interface?: string;
  region?: string;
  region_id?: string;
  url?: string;
}

interface CatalogEntry {
  type?: string;
  endpoints?: CatalogEndpoint[];
}

type Domain = { id: string } | { name: string };

/** The JSON body of a keystone v3 token request: one method, and a project scope when one is named. */
export interface KeystoneAuthBody {
  auth: {
    identity:
      | {
          methods: ['password'];
          password: { user: { password: string } & ({ id: string } | { name: string; domain: Domain }) };
        }
      | { methods: ['token']; token: { id: string } };
    scope?: { project: { id: string } | { name: string; domain: Domain } };
  };
}

/** The JSON body of a keystone v3 token request (exported for the unit test). */
export function keystoneAuthBody(env: NodeJS.ProcessEnv): KeystoneAuthBody {
  const token = env.OS_TOKEN || env.OS_AUTH_TOKEN;
  const { OS_PASSWORD: password, OS_USER_ID: userId, OS_USERNAME: userName } = env;
  let identity: KeystoneAuthBody['auth']['identity'];
  if (password && userId) {
    identity = { methods: ['password'], password: { user: { password, id: userId } } };
  } else if (password && userName) {
    const domain = domainOf(env.OS_USER_DOMAIN_ID, env.OS_USER_DOMAIN_NAME);
    identity = { methods: ['password'], password: { user: { password, name: userName, domain } } };
  } else if (token) {
    identity = { methods: ['token'], token: { id: token } };
  } else {
    throw new UsageError('keystone auth needs OS_USERNAME (or OS_USER_ID) and OS_PASSWORD, or OS_TOKEN');
  }
  const projectName = env.OS_PROJECT_NAME || env.OS_TENANT_NAME;
  if (env.OS_PROJECT_ID) return { auth: { identity, scope: { project: { id: env.OS_PROJECT_ID } } } };
  if (projectName) {
    const domain = domainOf(env.OS_PROJECT_DOMAIN_ID, env.OS_PROJECT_DOMAIN_NAME);
    return { auth: { identity, scope: { project: { name: projectName, domain } } } };
  }
  return { auth: { identity } };
}

function domainOf(id: string | undefined, name: string | undefined): Domain {
  return id ? { id } : { name: name || 'Default' };
}

/** $OS_AUTH_URL → the v3 tokens URL (accepts …/v3, …/v3/, or the bare keystone root). */
export function tokensUrl(authUrl: string): string {
  const u = authUrl.replace(/\/+$/, '');
  return u.endsWith('/v3') ? `${u}/auth/tokens` : `${u}/v3/auth/tokens`;
}

/** The image API endpoint without a trailing slash or version (Glance adds /v2 paths). */
export function normalizeEndpoint(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new UsageError(`not a Glance endpoint URL: ${url}`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new UsageError(`not a Glance endpoint URL: ${url}`);
  return u
    .toString()
    .replace(/\/+$/, '')
    .replace(/\/v2(\.\d+)?$/, '');
}

/** Picks the image endpoint from a v3 catalog. */
export function imageEndpoint(catalog: CatalogEntry[], iface: string, region?: string): string | undefined {
  const want = iface.replace(/URL$/, '');
  for (const entry of catalog) {
    if (entry.type !== 'image') continue;
    for (const e of entry.endpoints ?? []) {
      if ((e.interface ?? 'public') !== want) continue;
      if (region && e.region !== region && e.region_id !== region) continue;
      if (e.url) return e.url;
    }
  }
  return undefined;
}

/** Resolves the endpoint and token; talks to keystone only when the environment asks for it. */
export async function glanceSession(opts: SessionOptions = {}): Promise<GlanceSession> {
  const env = opts.env ?? process.env;
  const explicit = opts.endpoint || env.CLOUDLET_GLANCE_URL || env.OS_IMAGE_URL;
  const token = env.OS_TOKEN || env.OS_AUTH_TOKEN;
  const hasPassword = Boolean(env.OS_PASSWORD && (env.OS_USERNAME || env.OS_USER_ID));
  if (token && explicit) return { endpoint: normalizeEndpoint(explicit), token, auth: 'token' };
  if (!env.OS_AUTH_URL || (!hasPassword && !token)) {
    if (!explicit) {
      throw new UsageError(
        'no Glance endpoint: give --glance URL, set CLOUDLET_GLANCE_URL, or set OS_AUTH_URL and credentials ' +
          '(see docs/openstack.md)',
      );
    }
    return { endpoint: normalizeEndpoint(explicit), auth: 'standalone' };
  }
  const ks = await keystoneToken(env.OS_AUTH_URL, env, opts.timeoutMs ?? 30_000);
  let endpoint = explicit;
  if (!endpoint) {
    endpoint = imageEndpoint(ks.catalog, env.OS_INTERFACE || env.OS_ENDPOINT_TYPE || 'public', env.OS_REGION_NAME);
    if (!endpoint) {
      throw new UsageError(
        `keystone's catalog has no image endpoint (interface ${env.OS_INTERFACE || 'public'}` +
          `${env.OS_REGION_NAME ? `, region ${env.OS_REGION_NAME}` : ''}): give --glance URL`,
      );
    }
  }
  return { endpoint: normalizeEndpoint(endpoint), token: ks.token, auth: `keystone ${ks.method}` };
}

async function keystoneToken(
  authUrl: string,
  env: NodeJS.ProcessEnv,
  timeoutMs: number,
): Promise<{ token: string; catalog: CatalogEntry[]; method: string }> {
  const url = tokensUrl(authUrl);
  const body = keystoneAuthBody(env);
  let res: Response;
  try {
    res = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json' },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    throw new NetworkError(`keystone at ${url} is not reachable: ${reason(err)}`, { url });
  }
  const text = await res.text().catch(() => '');
  if (res.status === 401 || res.status === 403) {
    throw new NetworkError(`keystone refused the credentials (HTTP ${res.status}) at ${url}`, {
      url,
      status: res.status,
    });
  }
  const token = res.headers.get('x-subject-token');
  if (!res.ok || !token) {
    throw new NetworkError(`keystone token request failed: HTTP ${res.status} ${res.statusText} at ${url}`, {
      url,
      status: res.status,
    });
  }
  let catalog: CatalogEntry[] = [];
  try {
    const parsed = JSON.parse(text) as { token?: { catalog?: CatalogEntry[] } };
    catalog = parsed.token?.catalog ?? [];
  } catch {
    // a token without a readable body: only usable with an explicit endpoint
  }
  return { token, catalog, method: body.auth.identity.methods[0] };
}

/** The cause of a failed fetch() (ECONNREFUSED, ENOTFOUND…), not undici's "fetch failed". */
export function reason(err: unknown): string {
  const e = err as { cause?: { code?: string; message?: string }; message?: string; name?: string };
  if (e?.name === 'TimeoutError') return 'timed out';
  return e?.cause?.code ?? e?.cause?.message ?? e?.message ?? String(err);
}
