/**
 * A small client of the OpenStack Image API v2 (Glance): the calls the store needs and nothing
 * cloudlet-specific. Image data is streamed both ways, never held in memory. Errors: a Glance
 * that cannot be reached, or answers with an error status, is a NetworkError (exit 12); an
 * image that does not exist (HTTP 404) a NotFoundError (exit 3).
 */
import { createHash } from 'node:crypto';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CloudletError, NetworkError, NotFoundError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';
import { reason, type GlanceSession } from './auth.js';

/** An image as Glance v2 shows it: the core fields plus every extra property (strings). */
export interface GlanceImage {
  id: string;
  name: string | null;
  status: string;
  size: number | null;
  disk_format: string | null;
  container_format: string | null;
  visibility: string;
  os_hash_algo: string | null;
  os_hash_value: string | null;
  created_at: string;
  updated_at: string;
  [property: string]: unknown;
}

export interface NewImage {
  name: string;
  disk_format: string;
  container_format: string;
  visibility?: string;
  /** Extra properties (Glance keeps them as strings of ≤ 255 characters). */
  properties: Record<string, string>;
}

export interface UploadResult {
  bytes: number;
  sha256: string;
}

/** The headers of a JSON-patch request (Glance refuses plain application/json for PATCH). */
export const JSON_PATCH = 'application/openstack-images-v2.1-json-patch';

const API_TIMEOUT_MS = 60_000;
/** An upload or download with no byte moving for this long is abandoned. */
const IDLE_TIMEOUT_MS = 120_000;

export class GlanceClient {
  constructor(readonly session: GlanceSession) {}

  get endpoint(): string {
    return this.session.endpoint;
  }

  /** Headers every request carries (the keystone token, when there is one). */
  authHeaders(): Record<string, string> {
    return this.session.token ? { 'x-auth-token': this.session.token } : {};
  }

  fileUrl(id: string): string {
    return `${this.endpoint}/v2/images/${encodeURIComponent(id)}/file`;
  }

  async getImage(id: string): Promise<GlanceImage> {
    const res = await this.call('GET', `/v2/images/${encodeURIComponent(id)}`);
    if (res.status === 404) throw new NotFoundError(`no image ${id} in Glance at ${this.endpoint}`, { image: id });
    return (await this.json(res, `image ${id}`)) as GlanceImage;
  }

  /** Every image matching the filters (Glance's property filters, e.g. cloudlet_type=overlay), all pages. */
  async listImages(filters: Record<string, string>): Promise<GlanceImage[]> {
    const out: GlanceImage[] = [];
    const q = new URLSearchParams({ ...filters, limit: '200' });
    let path: string | undefined = `/v2/images?${q.toString()}`;
    for (let pages = 0; path && pages < 10_000; pages++) {
      const res = await this.call('GET', path);
      const page = (await this.json(res, 'the image list')) as { images?: GlanceImage[]; next?: string };
      out.push(...(page.images ?? []));
      path = page.next === undefined ? undefined : this.relative(page.next);
    }
    return out;
  }

  async createImage(image: NewImage): Promise<GlanceImage> {
    const body: Record<string, unknown> = {
      name: image.name,
      disk_format: image.disk_format,
      container_format: image.container_format,
      ...image.properties,
    };
    if (image.visibility) body.visibility = image.visibility;
    const res = await this.call('POST', '/v2/images', JSON.stringify(body), 'application/json');
    return (await this.json(res, 'the new image')) as GlanceImage;
  }

  /** Sets (adds or replaces) properties and removes others, in one JSON patch. */
  async setProperties(id: string, props: Record<string, string>, remove: string[] = []): Promise<GlanceImage> {
    const ops: object[] = Object.entries(props).map(([k, v]) => ({ op: 'add', path: `/${k}`, value: v }));
    for (const k of remove) ops.push({ op: 'remove', path: `/${k}` });
    const res = await this.call('PATCH', `/v2/images/${encodeURIComponent(id)}`, JSON.stringify(ops), JSON_PATCH);
    if (res.status === 404) throw new NotFoundError(`no image ${id} in Glance at ${this.endpoint}`, { image: id });
    return (await this.json(res, `image ${id}`)) as GlanceImage;
  }

  async deleteImage(id: string): Promise<void> {
    const res = await this.call('DELETE', `/v2/images/${encodeURIComponent(id)}`);
    if (res.status === 404) throw new NotFoundError(`no image ${id} in Glance at ${this.endpoint}`, { image: id });
    if (!res.ok) throw this.failure(res.status, await res.text().catch(() => ''), `deleting image ${id}`);
  }

  /**
   * Streams `data` as the image's contents (PUT /v2/images/ID/file): with Content-Length when
   * `size` is known, chunked otherwise. Returns the bytes sent and their sha256. A source that
   * fails makes the request fail too (never a short image that Glance would call active).
   */
  async upload(
    id: string,
    data: Readable,
    size: number | undefined,
    progress: Progress = silent,
  ): Promise<UploadResult> {
    const url = new URL(this.fileUrl(id));
    const headers: Record<string, string> = { ...this.authHeaders(), 'content-type': 'application/octet-stream' };
    if (size !== undefined) headers['content-length'] = String(size);
    const hash = createHash('sha256');
    let bytes = 0;
    const count = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        bytes += chunk.length;
        hash.update(chunk);
        progress.advance(chunk.length);
        cb(null, chunk);
      },
    });
    const req = (url.protocol === 'https:' ? httpsRequest : httpRequest)(url, { method: 'PUT', headers });
    req.setTimeout(IDLE_TIMEOUT_MS, () => req.destroy(new Error(`no progress for ${IDLE_TIMEOUT_MS / 1000} s`)));
    const answered = new Promise<IncomingMessage>((resolve, reject) => {
      req.once('response', resolve);
      req.once('error', reject);
    });
    answered.catch(() => undefined);
    try {
      await pipeline(data, count, req);
    } catch (err) {
      req.destroy();
      // Glance may have answered (e.g. 413, 409) before the body ended: report its answer.
      const early = await Promise.race([answered, new Promise<undefined>((r) => setTimeout(r, 50, undefined))]).catch(
        () => undefined,
      );
      if (early && early.statusCode && early.statusCode >= 400) {
        throw this.failure(early.statusCode, await readSmall(early), `uploading image ${id}`);
      }
      if (err instanceof CloudletError) throw err; // the source's own failure (tar failed, …)
      throw new NetworkError(`upload of image ${id} to ${this.endpoint} failed after ${bytes} bytes: ${reason(err)}`, {
        image: id,
      });
    }
    let res: IncomingMessage;
    try {
      res = await answered;
    } catch (err) {
      throw new NetworkError(`upload of image ${id} to ${this.endpoint} failed: ${reason(err)}`, { image: id });
    }
    const status = res.statusCode ?? 0;
    if (status < 200 || status >= 300) throw this.failure(status, await readSmall(res), `uploading image ${id}`);
    res.resume();
    return { bytes, sha256: hash.digest('hex') };
  }

  /**
   * Glance's `next` links are relative to its API root ("/v2/images?marker=…"), also behind a
   * path prefix (https://cloud/image); some proxies add the prefix or make them absolute.
   */
  private relative(link: string): string {
    const root = new URL(this.endpoint);
    const u = new URL(link, root);
    const prefix = root.pathname.replace(/\/+$/, '');
    const path = prefix && u.pathname.startsWith(`${prefix}/v2/`) ? u.pathname.slice(prefix.length) : u.pathname;
    return `${path}${u.search}`;
  }

  private async call(method: string, path: string, body?: string, type?: string): Promise<Response> {
    const url = `${this.endpoint}${path.startsWith('/') ? path : `/${path.replace(/^\/+/, '')}`}`;
    const headers: Record<string, string> = { ...this.authHeaders(), accept: 'application/json' };
    if (type) headers['content-type'] = type;
    let res: Response;
    try {
      res = await fetch(url, { method, headers, body, signal: AbortSignal.timeout(API_TIMEOUT_MS) });
    } catch (err) {
      throw new NetworkError(`Glance at ${this.endpoint} is not reachable: ${reason(err)}`, { glance: this.endpoint });
    }
    if (res.status === 401 || res.status === 403) {
      throw this.failure(
        res.status,
        await res.text().catch(() => ''),
        `${method} ${path.split('?')[0]} (check OS_* credentials)`,
      );
    }
    return res;
  }

  private async json(res: Response, what: string): Promise<unknown> {
    if (!res.ok) throw this.failure(res.status, await res.text().catch(() => ''), `reading ${what}`);
    try {
      return await res.json();
    } catch {
      throw new NetworkError(`Glance at ${this.endpoint} sent an unreadable answer for ${what}`, {
        glance: this.endpoint,
      });
    }
  }

  private failure(status: number, body: string, what: string): NetworkError {
    const detail = glanceMessage(body);
    return new NetworkError(
      `Glance at ${this.endpoint} refused ${what}: HTTP ${status}${detail ? ` (${detail})` : ''}`,
      {
        glance: this.endpoint,
        status,
      },
    );
  }
}

/** Glance's error bodies are small HTML pages: keep their text, one line. */
export function glanceMessage(body: string): string {
  const text = body
    .replace(/<[^>]*>/g, ' ')
    .replace(/\s+/g, ' ')
    .trim();
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

/** The first 64 KiB of an answer's body (error pages are small; the rest is drained). */
function readSmall(msg: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  return new Promise<string>((resolve) => {
    const done = (): void => resolve(Buffer.concat(chunks).toString('utf8'));
    msg.on('data', (c: Buffer) => {
      if (size < 64 << 10) chunks.push(c);
      size += c.length;
    });
    msg.once('end', done);
    msg.once('error', done);
    msg.once('close', done);
  });
}
