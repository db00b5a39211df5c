/**
 * Keystone v3 auth and Glance request building, against a tiny local HTTP server that records
 * what it is sent (no keystone runs on these machines; the Glance e2e test uses a real
 * glance-api without keystone). Checks: the token request's body for password and token auth,
 * the token taken from X-Subject-Token, the image endpoint picked from the catalog by interface
 * and region, the token sent as X-Auth-Token on every Glance call (pages followed), and the
 * errors: refused credentials and an unreachable keystone are NetworkError, no endpoint a
 * UsageError; OS_TOKEN with an endpoint talks to no keystone at all.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { glanceSession, imageEndpoint, keystoneAuthBody, normalizeEndpoint, tokensUrl } from '../../src/glance/auth.js';
import { GlanceClient } from '../../src/glance/client.js';
import { glanceImageId, isGlanceRef } from '../../src/glance/image.js';
import { NetworkError, UsageError } from '../../src/util/errors.js';

interface Seen {
  method: string;
  url: string;
  headers: IncomingMessage['headers'];
  body: string;
}

async function serve(
  handler: (req: Seen, res: ServerResponse, base: string) => void,
): Promise<{ base: string; seen: Seen[]; close: () => Promise<void> }> {
  const seen: Seen[] = [];
  let base = '';
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const s = {
        method: req.method ?? '',
        url: req.url ?? '',
        headers: req.headers,
        body: Buffer.concat(chunks).toString(),
      };
      seen.push(s);
      handler(s, res, base);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  return { base, seen, close: () => new Promise<void>((r) => server.close(() => r())) };
}

const passwordEnv = {
  OS_USERNAME: 'alice',
  OS_PASSWORD: 's3cret',
  OS_PROJECT_NAME: 'cloudlets',
  OS_USER_DOMAIN_NAME: 'Users',
  OS_PROJECT_DOMAIN_NAME: 'Projects',
};

test('keystone v3: the password and token request bodies', () => {
  assert.deepEqual(keystoneAuthBody(passwordEnv), {
    auth: {
      identity: {
        methods: ['password'],
        password: { user: { password: 's3cret', name: 'alice', domain: { name: 'Users' } } },
      },
      scope: { project: { name: 'cloudlets', domain: { name: 'Projects' } } },
    },
  });
  // Domains default to "Default"; ids win over names.
  assert.deepEqual(keystoneAuthBody({ OS_USERNAME: 'bob', OS_PASSWORD: 'x', OS_PROJECT_ID: 'p1' }), {
    auth: {
      identity: {
        methods: ['password'],
        password: { user: { password: 'x', name: 'bob', domain: { name: 'Default' } } },
      },
      scope: { project: { id: 'p1' } },
    },
  });
  assert.deepEqual(keystoneAuthBody({ OS_TOKEN: 'tok', OS_PROJECT_NAME: 'demo' }), {
    auth: {
      identity: { methods: ['token'], token: { id: 'tok' } },
      scope: { project: { name: 'demo', domain: { name: 'Default' } } },
    },
  });
  assert.throws(() => keystoneAuthBody({ OS_USERNAME: 'bob' }), UsageError);
});

test('URLs: tokens URL from OS_AUTH_URL, endpoints without /v2, glance:// references', () => {
  assert.equal(tokensUrl('http://ks:5000'), 'http://ks:5000/v3/auth/tokens');
  assert.equal(tokensUrl('http://ks:5000/v3/'), 'http://ks:5000/v3/auth/tokens');
  assert.equal(tokensUrl('https://cloud/identity/v3'), 'https://cloud/identity/v3/auth/tokens');
  assert.equal(normalizeEndpoint('http://g:9292/'), 'http://g:9292');
  assert.equal(normalizeEndpoint('http://g:9292/v2'), 'http://g:9292');
  assert.equal(normalizeEndpoint('https://cloud/image/v2/'), 'https://cloud/image');
  assert.throws(() => normalizeEndpoint('ftp://g'), UsageError);
  assert.throws(() => normalizeEndpoint('not a url'), UsageError);
  assert.ok(isGlanceRef('glance://3f1c'));
  assert.ok(!isGlanceRef('http://x/glance://'));
  assert.equal(glanceImageId('glance://3F2504E0-4F89-11D3-9A0C-0305E82C3301'), '3f2504e0-4f89-11d3-9a0c-0305e82c3301');
  assert.throws(() => glanceImageId('glance://../../etc'), UsageError);
  const catalog = [
    { type: 'identity', endpoints: [{ interface: 'public', url: 'http://ks' }] },
    {
      type: 'image',
      endpoints: [
        { interface: 'internal', region: 'r1', url: 'http://internal-r1' },
        { interface: 'public', region: 'r1', url: 'http://public-r1' },
        { interface: 'public', region_id: 'r2', url: 'http://public-r2' },
      ],
    },
  ];
  assert.equal(imageEndpoint(catalog, 'public'), 'http://public-r1');
  assert.equal(imageEndpoint(catalog, 'public', 'r2'), 'http://public-r2');
  assert.equal(imageEndpoint(catalog, 'internalURL', 'r1'), 'http://internal-r1');
  assert.equal(imageEndpoint(catalog, 'admin'), undefined);
});

test('keystone password auth: token from X-Subject-Token, endpoint from the catalog, sent to Glance', async () => {
  const srv = await serve((req, res, base) => {
    if (req.method === 'POST' && req.url === '/identity/v3/auth/tokens') {
      res.writeHead(201, { 'content-type': 'application/json', 'x-subject-token': 'gAAAA-token' });
      res.end(
        JSON.stringify({
          token: {
            catalog: [
              { type: 'image', endpoints: [{ interface: 'public', region: 'edge', url: `${base}/image/` }] },
              { type: 'image', endpoints: [{ interface: 'public', region: 'core', url: 'http://wrong' }] },
            ],
          },
        }),
      );
      return;
    }
    if (req.url.startsWith('/image/v2/images')) {
      res.writeHead(200, { 'content-type': 'application/json' });
      // Glance's next links are relative to its API root, without the endpoint's path prefix;
      // some proxies add the prefix: both are followed.
      const page = Number(/marker=(\d)/.exec(req.url)?.[1] ?? 0);
      const next = ['/v2/images?cloudlet_type=overlay&marker=1', '/image/v2/images?cloudlet_type=overlay&marker=2'];
      res.end(JSON.stringify({ images: [{ id: `i${page}` }], ...(next[page] ? { next: next[page] } : {}) }));
      return;
    }
    res.writeHead(404).end();
  });
  try {
    const env = { ...passwordEnv, OS_AUTH_URL: `${srv.base}/identity`, OS_REGION_NAME: 'edge' };
    const session = await glanceSession({ env });
    assert.deepEqual(session, { endpoint: `${srv.base}/image`, token: 'gAAAA-token', auth: 'keystone password' });
    const auth = srv.seen[0]!;
    assert.equal(auth.headers['content-type'], 'application/json');
    assert.deepEqual(JSON.parse(auth.body), keystoneAuthBody(env));
    const images = await new GlanceClient(session).listImages({ cloudlet_type: 'overlay' });
    assert.deepEqual(
      images.map((i) => i.id),
      ['i0', 'i1', 'i2'],
      'the next pages were followed',
    );
    const calls = srv.seen.slice(1);
    assert.equal(calls.length, 3);
    for (const c of calls) assert.equal(c.headers['x-auth-token'], 'gAAAA-token');
    assert.match(calls[0]!.url, /^\/image\/v2\/images\?cloudlet_type=overlay&limit=\d+$/);
    // An explicit endpoint wins over the catalog (the token is still fetched).
    const explicit = await glanceSession({ env, endpoint: 'http://glance.example:9292/v2' });
    assert.equal(explicit.endpoint, 'http://glance.example:9292');
    assert.equal(explicit.token, 'gAAAA-token');
  } finally {
    await srv.close();
  }
});

test('OS_TOKEN with an endpoint: no keystone call; without credentials: standalone', async () => {
  const srv = await serve((_req, res) => res.writeHead(500).end());
  try {
    const s = await glanceSession({
      env: { OS_TOKEN: 't0k', OS_AUTH_URL: srv.base, CLOUDLET_GLANCE_URL: 'http://g:9292' },
    });
    assert.deepEqual(s, { endpoint: 'http://g:9292', token: 't0k', auth: 'token' });
    const plain = await glanceSession({ env: { OS_IMAGE_URL: 'http://g2:9292/' } });
    assert.deepEqual(plain, { endpoint: 'http://g2:9292', auth: 'standalone' });
    assert.equal(srv.seen.length, 0, 'keystone was not asked');
    assert.equal(new GlanceClient(plain).authHeaders()['x-auth-token'], undefined);
  } finally {
    await srv.close();
  }
});

test('keystone errors: refused or unreachable is a network error, no endpoint a usage error', async () => {
  const srv = await serve((_req, res) =>
    res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":{}}'),
  );
  try {
    await assert.rejects(
      glanceSession({ env: { ...passwordEnv, OS_AUTH_URL: srv.base } }),
      (e: unknown) => e instanceof NetworkError && /refused the credentials \(HTTP 401\)/.test(e.message),
    );
  } finally {
    await srv.close();
  }
  await assert.rejects(
    glanceSession({ env: { ...passwordEnv, OS_AUTH_URL: srv.base } }),
    (e: unknown) => e instanceof NetworkError && /not reachable: ECONNREFUSED/.test(e.message),
  );
  await assert.rejects(
    glanceSession({ env: {} }),
    (e: unknown) => e instanceof UsageError && /no Glance endpoint/.test(e.message),
  );
  // A catalog without an image service.
  const bare = await serve((_req, res) =>
    res.writeHead(201, { 'x-subject-token': 't' }).end(JSON.stringify({ token: { catalog: [] } })),
  );
  try {
    await assert.rejects(
      glanceSession({ env: { ...passwordEnv, OS_AUTH_URL: bare.base } }),
      (e: unknown) => e instanceof UsageError && /no image endpoint/.test(e.message),
    );
  } finally {
    await bare.close();
  }
});
