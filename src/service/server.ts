/**
 * The cloudlet's HTTP API over the library (docs/service.md): fastify routes from the table in
 * api-spec.ts, each a call into src/api — no second implementation of any operation. An
 * uploaded overlay is the request's own byte stream, handed to synthesize() as it arrives
 * (counted against the upload limit); the server allocates the host ports of the forwards,
 * holds a semaphore for concurrent syntheses, checks the bearer token before anything else,
 * and answers errors with the CLI's JSON error object.
 */
import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Readable } from 'node:stream';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { importBaseFrom, listBases, showBase } from '../api/base.js';
import { cloudletInfo } from '../api/cloudlet.js';
import { findInstance, instanceLog, listInstanceSummaries, stopInstance } from '../api/instance.js';
import type { CloudletInfoMessage } from '../api/remote.js';
import { synthesize } from '../api/synthesize.js';
import type { LauncherChoice } from '../api/launcher.js';
import { NotFoundError, UnauthorizedError, UsageError, BusyError } from '../util/errors.js';
import { VERSION } from '../util/version.js';
import { openApiDocument, ROUTES, type RouteSpec } from './api-spec.js';
import { bearer, type TokenFile } from './auth.js';
import { Directory } from './directory.js';
import { errorAnswer } from './http-errors.js';
import { limitBytes, Semaphore } from './limits.js';
import { PortAllocator, type PortRange } from './ports.js';

export interface ServerConfig {
  /** The base library (a cloudlet); not needed by a directory. */
  root: string;
  name: string;
  /** The URL clients reach this API at (for info, mDNS, heartbeats). */
  url: string;
  tokens: TokenFile;
  /** Max bytes of one upload. */
  maxUpload: number;
  maxSyntheses: number;
  ports: PortRange;
  /** Address the VMs' forwards bind (the listen host; 0.0.0.0 for any). */
  forwardHost: string;
  launcher: LauncherChoice;
  /** How long to wait for the guest's first answer. */
  readyTimeoutMs: number;
  /** Serve the directory routes (serve --directory). */
  directory: boolean;
  tls?: { cert: Buffer; key: Buffer };
  /** One line per request on stderr. */
  log?: (line: string) => void;
}

export interface CloudletServer {
  app: FastifyInstance;
  semaphore: Semaphore;
  ports: PortAllocator;
  directory?: Directory;
  info(): Promise<CloudletInfoMessage>;
}

const SYNTH_RETRY_AFTER_S = 5;

export async function buildServer(cfg: ServerConfig): Promise<CloudletServer> {
  const app = Fastify({
    logger: false,
    ...(cfg.tls ? { https: { cert: cfg.tls.cert, key: cfg.tls.key } } : {}),
    bodyLimit: 1 << 20, // JSON bodies; uploads are streams with their own limit
    requestTimeout: 0,
    ajv: { customOptions: { coerceTypes: 'array', removeAdditional: false, allErrors: false } },
  }) as unknown as FastifyInstance;
  const semaphore = new Semaphore(cfg.maxSyntheses);
  const ports = new PortAllocator(cfg.ports, cfg.forwardHost === '0.0.0.0' ? '0.0.0.0' : cfg.forwardHost);
  const directory = cfg.directory ? new Directory() : undefined;
  const doc = openApiDocument(VERSION);

  // Instances that run already (a restarted server) keep their ports.
  if (!cfg.directory) {
    for (const i of (await listInstanceSummaries(cfg.root)).instances) {
      if (i.status === 'running')
        ports.hold(
          i.forwards.map((f) => f.hostPort),
          i.id,
        );
    }
  }

  // Expect: 100-continue goes through the routes like any request; an upload handler sends the
  // 100 only once it accepts the upload (token, size, concurrency checked), so a refused client
  // never starts sending.
  app.server.on('checkContinue', (req, res) => {
    // JSON bodies are small and checked once read: they get their 100 at once, as without us.
    if ((req.headers['content-type'] ?? '').split(';')[0]!.trim() !== 'application/octet-stream') res.writeContinue();
    app.server.emit('request', req, res);
  });

  // Uploads: the request's own stream is the body (nothing is read or buffered here).
  app.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));

  app.setErrorHandler((err, _req, reply) => {
    const e = err as { validation?: unknown; message: string; statusCode?: number; code?: string };
    if (e.validation) return sendError(reply, new UsageError(`invalid request: ${e.message}`));
    if (e.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
      return sendError(reply, new UsageError(`unsupported content type: ${e.message}`, { http_status: 415 }));
    }
    if (e.statusCode && e.statusCode >= 400 && e.statusCode < 500 && !(err instanceof Error && 'exitCode' in err)) {
      return sendError(reply, new UsageError(e.message, { http_status: e.statusCode }));
    }
    return sendError(reply, err);
  });
  app.setNotFoundHandler((req, reply) =>
    sendError(reply, new NotFoundError(`no route ${req.method} ${req.url.split('?')[0]}`)),
  );

  // The token comes first: nothing of an unauthenticated request is looked at, its body never read.
  app.addHook('onRequest', async (req, reply) => {
    const route = ROUTES.find((r) => r.method === req.method && r.url === req.routeOptions.url);
    if (route && !route.auth) return;
    if (!(await cfg.tokens.accepts(bearer(req.headers.authorization)))) {
      reply.header('connection', 'close');
      throw new UnauthorizedError(
        req.headers.authorization ? 'the bearer token is not accepted' : 'a bearer token is required',
      );
    }
  });
  app.addHook('onResponse', async (req, reply) => {
    cfg.log?.(`${req.method} ${req.url.split('?')[0]} ${reply.statusCode} ${Math.round(reply.elapsedTime)}ms`);
  });

  const info = async (): Promise<CloudletInfoMessage> =>
    cfg.directory
      ? {
          message_type: 'cloudlet_info',
          name: cfg.name,
          url: cfg.url,
          version: VERSION,
          bases: [],
          mem_free_bytes: 0,
          mem_total_bytes: 0,
          cpus: 0,
          load1: 0,
          syntheses_running: 0,
          max_syntheses: 0,
          launcher: 'none',
        }
      : cloudletInfo(cfg.root, {
          name: cfg.name,
          url: cfg.url,
          synthesesRunning: semaphore.inUse,
          maxSyntheses: semaphore.max,
          launcher: cfg.launcher,
        });

  const handlers: Record<string, (req: FastifyRequest, reply: FastifyReply) => Promise<unknown>> = {
    health: async () => ({ message_type: 'health', status: 'ok', version: VERSION, name: cfg.name }),
    openapi: async () => doc,
    info: async () => info(),
    listBases: async () => listBases(cfg.root),
    showBase: async (req) => showBase(cfg.root, (req.params as { ref: string }).ref),
    importBase: async (req, reply) => {
      const r = await importUploadedBase(cfg, req, reply);
      return reply.code(201).send(r);
    },
    synthesize: async (req, reply) => reply.code(201).send(await synthesizeRequest(cfg, req, reply, semaphore, ports)),
    listInstances: async () => {
      const r = await listInstanceSummaries(cfg.root);
      ports.reconcile(new Set(r.instances.filter((i) => i.status === 'running').map((i) => i.id)));
      return r;
    },
    showInstance: async (req) => {
      const id = (req.params as { id: string }).id;
      const list = await listInstanceSummaries(cfg.root);
      const found = list.instances.find((i) => i.id === id);
      if (!found) throw new NotFoundError(`no instance ${id}`, { instance: id });
      return { message_type: 'instance', ...found };
    },
    stopInstance: async (req) => {
      const id = (req.params as { id: string }).id;
      await findInstance(cfg.root, id).then((s) => {
        if (s.id !== id) throw new NotFoundError(`no instance ${id}`, { instance: id });
      });
      const r = await stopInstance(cfg.root, id);
      ports.release(id);
      return r;
    },
    instanceLogs: async (req) => {
      const id = (req.params as { id: string }).id;
      const q = req.query as { source?: string };
      const s = await findInstance(cfg.root, id);
      if (s.id !== id) throw new NotFoundError(`no instance ${id}`, { instance: id });
      const r = await instanceLog(cfg.root, id, q.source === 'qemu');
      return { message_type: 'logs', instance: r.instance, text: r.text };
    },
    heartbeat: async (req) => {
      const name = (req.params as { name: string }).name;
      const body = req.body as CloudletInfoMessage & { ttl_s?: number };
      if (body.name !== name) throw new UsageError('the name in the path and in the body differ');
      directory!.register(body, body.ttl_s ?? 30);
      return { message_type: 'heartbeat', name, ttl_s: body.ttl_s ?? 30 };
    },
    directory: async (req) => ({
      message_type: 'directory',
      cloudlets: directory!.list((req.query as { base?: string }).base),
    }),
  };

  for (const r of ROUTES) {
    if (r.directory && !cfg.directory) continue;
    if (cfg.directory && !r.directory && !['health', 'openapi', 'info'].includes(r.operationId)) continue;
    const schema: Record<string, unknown> = {};
    if (r.params) schema['params'] = r.params;
    if (r.querystring) schema['querystring'] = r.querystring;
    // Upload routes validate a JSON body themselves (the schema cannot apply to a stream).
    if (r.body && !r.upload) schema['body'] = r.body;
    const handler = handlers[r.operationId];
    if (!handler) throw new Error(`no handler for ${r.operationId}`);
    app.route({ method: r.method, url: r.url, schema, handler });
  }

  return { app, semaphore, ports, directory, info };
}

function sendError(reply: FastifyReply, err: unknown): FastifyReply {
  const a = errorAnswer(err);
  for (const [k, v] of Object.entries(a.headers)) reply.header(k, v);
  // An error before the body was read (401, 413, 429): close, so an upload stops at once.
  if (!reply.request.raw.complete) reply.header('connection', 'close');
  return reply.code(a.status).send(a.body);
}

/** The upload's byte stream, once it is accepted: a client that waits for 100 Continue gets it now. */
function acceptUpload(req: FastifyRequest, reply: FastifyReply): Readable {
  if (/\b100-continue\b/i.test(req.headers.expect ?? '') && !reply.raw.headersSent) reply.raw.writeContinue();
  return req.body as Readable;
}

function isUpload(req: FastifyRequest): boolean {
  return (req.headers['content-type'] ?? '').split(';')[0]!.trim() === 'application/octet-stream';
}

/** Checks Content-Length against the limit before a byte is read (413 at once). */
function checkLength(req: FastifyRequest, max: number): void {
  const len = req.headers['content-length'];
  if (len !== undefined && (!/^\d+$/.test(len) || Number(len) > max)) {
    throw new UsageError(`the upload (${len} bytes) is larger than the ${max} bytes allowed`, {
      http_status: 413,
      max_upload: max,
    });
  }
}

function validateJson(req: FastifyRequest, route: string): void {
  const spec = ROUTES.find((r) => r.operationId === route) as RouteSpec;
  const ok = req.validateInput(req.body, spec.body as Record<string, unknown>);
  if (!ok) throw new UsageError(`invalid request body for ${route}`);
}

interface SynthesizeQuery {
  base?: string;
  guest_port?: number[];
  wait_path?: string;
  name?: string;
}

async function synthesizeRequest(
  cfg: ServerConfig,
  req: FastifyRequest,
  reply: FastifyReply,
  semaphore: Semaphore,
  ports: PortAllocator,
): Promise<Record<string, unknown>> {
  let base: string;
  let guest: number[];
  let waitPath: string | undefined;
  let name: string | undefined;
  let overlay: Parameters<typeof synthesize>[0]['overlay'];
  const upload = isUpload(req);
  if (upload) {
    const q = req.query as SynthesizeQuery;
    if (!q.base || !q.guest_port?.length) throw new UsageError('an upload needs ?base=…&guest_port=… in the query');
    checkLength(req, cfg.maxUpload);
    base = q.base;
    guest = q.guest_port;
    waitPath = q.wait_path;
    name = q.name;
  } else {
    validateJson(req, 'synthesize');
    const b = req.body as {
      base: string;
      overlay_url: string;
      guest_ports: number[];
      wait_path?: string;
      name?: string;
    };
    base = b.base;
    guest = b.guest_ports;
    waitPath = b.wait_path;
    name = b.name;
    overlay = { kind: 'url', url: b.overlay_url, maxBytes: cfg.maxUpload, name: name ?? b.overlay_url };
    if (b.overlay_url.startsWith('glance://')) overlay = b.overlay_url;
  }
  const release = semaphore.tryAcquire();
  if (!release) {
    throw new BusyError(`this cloudlet runs ${semaphore.max} syntheses already: try again shortly`, {
      http_status: 429,
      retry_after_s: SYNTH_RETRY_AFTER_S,
    });
  }
  const tag = `pending-${randomBytes(6).toString('hex')}`;
  try {
    const hostPorts = await ports.allocate(guest.length, tag);
    const forwards = guest.map((g, i) => ({ hostAddr: cfg.forwardHost, hostPort: hostPorts[i]!, guestPort: g }));
    if (upload) {
      const stream = acceptUpload(req, reply);
      const size = req.headers['content-length'] ? Number(req.headers['content-length']) : undefined;
      overlay = { kind: 'stream', name: name ?? 'upload', body: limitBytes(stream, cfg.maxUpload), size };
    }
    const local = cfg.forwardHost === '0.0.0.0' ? '127.0.0.1' : cfg.forwardHost;
    const first = forwards[0]!;
    const { result, vm, state } = await synthesize({
      root: cfg.root,
      base,
      overlay: overlay!,
      forwards,
      waitHttp: waitPath ? `http://${local}:${first.hostPort}${waitPath}` : undefined,
      waitTcp: waitPath ? undefined : first.hostPort,
      detach: true,
      launcher: cfg.launcher,
      readyTimeoutMs: cfg.readyTimeoutMs,
    });
    await vm.qmp.close();
    ports.rename(tag, result.instance);
    const host = new URL(cfg.url).hostname;
    const reach = cfg.forwardHost === '0.0.0.0' ? host : cfg.forwardHost;
    return {
      ...result,
      launcher: state.launcher ?? 'qemu',
      domain: state.domain,
      endpoints: forwards.map((f) => ({ guestPort: f.guestPort, url: `http://${reach}:${f.hostPort}/` })),
      dir: undefined,
    };
  } catch (err) {
    ports.release(tag);
    // An upload cut short leaves its socket half-read: close it.
    if (upload) (req.body as Readable).destroy();
    throw err;
  } finally {
    release();
  }
}

/** A base package: uploaded (streamed to a temporary file of the library, bounded) or fetched. */
async function importUploadedBase(cfg: ServerConfig, req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
  const tmp = join(cfg.root, 'tmp');
  await mkdir(tmp, { recursive: true });
  const file = join(tmp, `upload-${randomBytes(8).toString('hex')}.tar`);
  try {
    if (isUpload(req)) {
      checkLength(req, cfg.maxUpload);
      await pipeline(limitBytes(acceptUpload(req, reply), cfg.maxUpload), createWriteStream(file, { flags: 'wx' }));
    } else {
      validateJson(req, 'importBase');
      const { url } = req.body as { url: string };
      const { HttpStream } = await import('../api/http-fetch.js');
      await pipeline(new HttpStream(url, { maxBytes: cfg.maxUpload }).body(), createWriteStream(file, { flags: 'wx' }));
    }
    return await importBaseFrom({ root: cfg.root, input: file });
  } finally {
    await rm(file, { force: true });
  }
}
