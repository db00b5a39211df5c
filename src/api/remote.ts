/**
 * The client of a cloudlet's HTTP API (docs/service.md): synthesize an overlay there — a local
 * file streamed up with progress (never read whole), or a URL the cloudlet fetches itself —,
 * list, inspect and stop its instances, read their logs, ask its health and what it holds. A
 * cloudlet's error answer is the CLI's own JSON error object, so it comes back as the same
 * error class (and exit code) a local run would have raised.
 */
import { createReadStream } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import type { Readable } from 'node:stream';
import { CloudletError, deserializeError, NetworkError, NotFoundError, UsageError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';
import type { SynthesizeResult } from './synthesize.js';

export interface ClientOptions {
  /** Bearer token (else $CLOUDLET_TOKEN). */
  token?: string;
  /** PEM CA certificate(s) to trust for https (a self-signed cloudlet). */
  ca?: string | Buffer;
  /** Per request, except uploads and syntheses (default 30 s). */
  timeoutMs?: number;
}

/** A token from a file (first non-empty, non-comment line) or $CLOUDLET_TOKEN. */
export async function readToken(file?: string): Promise<string | undefined> {
  if (file) {
    const text = await readFile(file, 'utf8').catch(() => {
      throw new NotFoundError(`token file ${file} cannot be read`, { path: file });
    });
    const line = text
      .split('\n')
      .map((l) => l.trim())
      .find((l) => l && !l.startsWith('#'));
    if (!line) throw new UsageError(`token file ${file} holds no token`, { path: file });
    return line;
  }
  return process.env['CLOUDLET_TOKEN'] || undefined;
}

export interface RemoteSynthesizeOptions {
  base: string;
  /** A local overlay file (uploaded) or an http(s)/glance:// URL (fetched by the cloudlet). */
  overlay: string;
  /** Guest ports to forward; the cloudlet picks the host ports. */
  guestPorts: number[];
  /** Ready = this path answers HTTP on the first forward (else: its TCP port accepts). */
  waitPath?: string;
  /** What to call the overlay on the cloudlet (default: the file's name). */
  name?: string;
  progress?: Progress;
}

export interface RemoteSynthesizeResult extends SynthesizeResult {
  launcher?: string;
  domain?: string;
  /** Host and port a client reaches each forward at (the cloudlet's host when it listens on any). */
  endpoints?: Array<{ guestPort: number; url: string }>;
  /** Bytes uploaded (0 for a URL). */
  uploaded_bytes: number;
}

interface Answer {
  status: number;
  headers: IncomingMessage['headers'];
  body: Buffer;
}

export class CloudletClient {
  readonly url: URL;

  constructor(
    url: string,
    private readonly opts: ClientOptions = {},
  ) {
    let u: URL;
    try {
      u = new URL(url);
    } catch {
      throw new UsageError(`not a cloudlet URL: ${url}`);
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new UsageError(`not an http(s) URL: ${url}`);
    this.url = u;
  }

  private target(path: string, query?: Record<string, string | number | Array<string | number> | undefined>): URL {
    const u = new URL(`/v1${path}`, this.url);
    for (const [k, v] of Object.entries(query ?? {})) {
      if (v === undefined) continue;
      for (const x of Array.isArray(v) ? v : [v]) u.searchParams.append(k, String(x));
    }
    return u;
  }

  /** One request; the body a buffer or a stream of known length. Rejects on transport errors only. */
  private send(
    method: string,
    u: URL,
    body?: { data: Buffer | Readable; type: string; length?: number },
    timeoutMs = this.opts.timeoutMs ?? 30_000,
  ): Promise<Answer> {
    const headers: Record<string, string> = { accept: 'application/json' };
    if (this.opts.token) headers['authorization'] = `Bearer ${this.opts.token}`;
    if (body) {
      headers['content-type'] = body.type;
      const len = Buffer.isBuffer(body.data) ? body.data.length : body.length;
      if (len !== undefined) headers['content-length'] = String(len);
      // A stream waits for 100 Continue: a refusal (401, 413, 429) arrives before a byte is sent,
      // instead of racing the upload (the server closes, the client's write fails with EPIPE).
      if (!Buffer.isBuffer(body.data)) headers['expect'] = '100-continue';
    }
    const request = u.protocol === 'https:' ? httpsRequest : httpRequest;
    return new Promise<Answer>((resolve, reject) => {
      let answered = false;
      const req = request(u, { method, headers, ca: this.opts.ca, timeout: timeoutMs }, (res) => {
        answered = true;
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }),
        );
        res.on('error', reject);
        // An early answer (401, 413, 429) ends the upload: stop sending.
        if (body && !Buffer.isBuffer(body.data) && (res.statusCode ?? 0) >= 400) body.data.unpipe(req);
      });
      req.on('timeout', () => req.destroy(new NetworkError(`${u.origin} did not answer within ${timeoutMs} ms`)));
      req.on('error', (err) =>
        reject(
          err instanceof CloudletError
            ? err
            : new NetworkError(`cannot reach the cloudlet at ${u.origin}: ${err.message}`, { url: u.origin }),
        ),
      );
      if (!body) req.end();
      else if (Buffer.isBuffer(body.data)) req.end(body.data);
      else {
        const data = body.data;
        // Held until the 100: a 'data' listener (progress) would otherwise let bytes flow to nobody.
        data.pause();
        data.on('error', (err) => req.destroy(err));
        // A server or proxy that never sends the 100 gets the body after a second (RFC 9110 10.1.1).
        let started = false;
        const start = (): void => {
          if (started || answered || req.destroyed) return;
          started = true;
          data.pipe(req);
        };
        req.once('continue', start);
        setTimeout(start, 1000).unref();
      }
    });
  }

  /** The JSON of a 2xx answer, or the cloudlet's error as its own class. */
  private json<T>(a: Answer, what: string): T {
    let parsed: unknown;
    try {
      parsed = JSON.parse(a.body.toString('utf8'));
    } catch {
      parsed = undefined;
    }
    if (a.status >= 200 && a.status < 300 && parsed && typeof parsed === 'object') return parsed as T;
    const e = parsed as { message_type?: string; code?: string; message?: string } | undefined;
    if (e?.message_type === 'error' && typeof e.code === 'string') {
      const { message_type: _t, code, message, exit_code: _x, ...details } = e as Record<string, unknown>;
      const err = deserializeError({
        code: String(code),
        message: `${this.url.origin}: ${String(message)}`,
        details: {},
      });
      if (err instanceof CloudletError) Object.assign(err.details, details, { http_status: a.status });
      return throwIt(err);
    }
    return throwIt(
      new NetworkError(`${what}: ${this.url.origin} answered HTTP ${a.status}`, {
        url: this.url.origin,
        status: a.status,
      }),
    );
  }

  async health(): Promise<{ message_type: 'health'; status: string; version: string; name: string }> {
    return this.json(await this.send('GET', this.target('/health')), 'health');
  }

  async info(): Promise<CloudletInfoMessage> {
    return this.json(await this.send('GET', this.target('/info')), 'info');
  }

  async bases(): Promise<{ message_type: 'base_list'; bases: Array<{ id: string; name?: string }> }> {
    return this.json(await this.send('GET', this.target('/bases')), 'bases');
  }

  async list(): Promise<{ message_type: 'ps'; instances: Array<Record<string, unknown> & { id: string }> }> {
    return this.json(await this.send('GET', this.target('/instances')), 'list');
  }

  async show(id: string): Promise<Record<string, unknown> & { id: string; status: string }> {
    return this.json(await this.send('GET', this.target(`/instances/${encodeURIComponent(id)}`)), 'show');
  }

  async stop(id: string): Promise<{ message_type: 'stop'; instance: string; was: string; removed: boolean }> {
    return this.json(await this.send('DELETE', this.target(`/instances/${encodeURIComponent(id)}`)), 'stop');
  }

  async logs(id: string, qemu = false): Promise<{ message_type: 'logs'; instance: string; text: string }> {
    const u = this.target(`/instances/${encodeURIComponent(id)}/logs`, { source: qemu ? 'qemu' : 'serial' });
    return this.json(await this.send('GET', u), 'logs');
  }

  /** Synthesize there: upload the file (streamed, with progress) or hand over the URL. */
  async synthesize(o: RemoteSynthesizeOptions): Promise<RemoteSynthesizeResult> {
    const progress = o.progress ?? silent;
    const long = 30 * 60_000;
    if (/^(https?|glance):\/\//.test(o.overlay)) {
      const payload = {
        base: o.base,
        overlay_url: o.overlay,
        guest_ports: o.guestPorts,
        wait_path: o.waitPath,
        name: o.name,
      };
      const data = Buffer.from(JSON.stringify(payload));
      const a = await this.send('POST', this.target('/instances'), { data, type: 'application/json' }, long);
      return { uploaded_bytes: 0, ...this.json<Omit<RemoteSynthesizeResult, 'uploaded_bytes'>>(a, 'synthesize') };
    }
    const st = await stat(o.overlay).catch(() => undefined);
    if (!st?.isFile()) throw new NotFoundError(`overlay not found: ${o.overlay}`, { path: o.overlay });
    const name =
      o.name ??
      o.overlay
        .split('/')
        .pop()!
        .replace(/[^A-Za-z0-9._-]/g, '_')
        .replace(/^[._-]+/, '');
    const u = this.target('/instances', {
      base: o.base,
      guest_port: o.guestPorts,
      wait_path: o.waitPath,
      name: name || undefined,
    });
    const file = createReadStream(o.overlay, { highWaterMark: 1 << 20 });
    progress.step(`uploading ${o.overlay} to ${this.url.host}`, st.size);
    let sent = 0;
    file.on('data', (c) => {
      sent += c.length;
      progress.advance(c.length);
      if (sent === st.size) {
        progress.done(`uploaded ${st.size} bytes`);
        progress.step(`synthesizing on ${this.url.host}`);
      }
    });
    try {
      const a = await this.send('POST', u, { data: file, type: 'application/octet-stream', length: st.size }, long);
      const r = this.json<Omit<RemoteSynthesizeResult, 'uploaded_bytes'>>(a, 'synthesize');
      progress.done('VM running');
      return { uploaded_bytes: sent, ...r };
    } catch (err) {
      progress.fail('remote synthesis failed');
      throw err;
    } finally {
      file.destroy();
    }
  }

  /** Import a base package (from `base export`) there: uploaded, streamed from the file. */
  async importBase(pkg: string): Promise<{ message_type: 'base_import'; id: string; added: boolean }> {
    const st = await stat(pkg).catch(() => undefined);
    if (!st?.isFile()) throw new NotFoundError(`package not found: ${pkg}`, { path: pkg });
    const file = createReadStream(pkg, { highWaterMark: 1 << 20 });
    try {
      const a = await this.send(
        'POST',
        this.target('/bases'),
        { data: file, type: 'application/octet-stream', length: st.size },
        30 * 60_000,
      );
      return this.json<{ message_type: 'base_import'; id: string; added: boolean }>(a, 'base import');
    } finally {
      file.destroy();
    }
  }

  /** Directory mode: register or refresh a cloudlet (heartbeat). */
  async heartbeat(info: CloudletInfoMessage, ttlS: number): Promise<void> {
    const data = Buffer.from(JSON.stringify({ ...info, ttl_s: ttlS }));
    this.json(
      await this.send('PUT', this.target(`/directory/cloudlets/${encodeURIComponent(info.name)}`), {
        data,
        type: 'application/json',
      }),
      'heartbeat',
    );
  }

  /** Directory mode: the cloudlets that heartbeat within their TTL. */
  async directory(base?: string): Promise<{ message_type: 'directory'; cloudlets: DirectoryEntry[] }> {
    return this.json(await this.send('GET', this.target('/directory/cloudlets', { base })), 'directory');
  }
}

function throwIt(err: Error): never {
  throw err;
}

/** What a cloudlet says about itself (GET /v1/info, mDNS TXT, directory heartbeats). */
export interface CloudletInfoMessage {
  message_type: 'cloudlet_info';
  name: string;
  /** The API's base URL as clients should use it. */
  url: string;
  version: string;
  bases: Array<{ id: string; name?: string }>;
  mem_free_bytes: number;
  mem_total_bytes: number;
  cpus: number;
  load1: number;
  syntheses_running: number;
  max_syntheses: number;
  launcher: string;
}

export interface DirectoryEntry extends CloudletInfoMessage {
  seen_at: string;
  expires_at: string;
}
