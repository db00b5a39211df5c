/**
 * Where an overlay comes from, opened as one front-to-back stream for the rebuild pipeline: a
 * local file (checked first with random access — header, footer and index — so a truncated or
 * spliced file is refused before anything happens), an HTTP(S) URL (streamed at link speed,
 * resumed with Range after a dropped connection), or any byte stream (an upload).
 */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { HttpStream, isUrl, type HttpStreamInfo } from '../net/http-stream.js';
import { OverlayReader } from '../overlay/reader.js';
import { OverlayStreamReader } from '../overlay/stream-reader.js';
import type { OverlayHeader } from '../overlay/format.js';
import { CorruptInputError, NotFoundError } from '../util/errors.js';
import type { TrustedKey } from '../util/sign.js';
import { silent, type Progress } from '../util/progress.js';

export type OverlayInput =
  | { kind: 'file'; path: string }
  | {
      kind: 'url';
      url: string;
      headers?: Record<string, string>;
      maxBytes?: number;
      /** No byte for this long counts as a dropped connection (resumed a few times, then refused). */
      idleMs?: number;
      /** The whole file's sha256 when the store knows it (Glance's os_hash_value). */
      sha256?: string;
      /** What to call it (default: the URL). */
      name?: string;
    }
  | { kind: 'stream'; name: string; body: AsyncIterable<Uint8Array>; size?: number };

/** A path or an http(s) URL as an OverlayInput. */
export function overlayInput(ref: string): OverlayInput {
  return isUrl(ref) ? { kind: 'url', url: ref } : { kind: 'file', path: ref };
}

export interface OpenedOverlay {
  reader: OverlayStreamReader;
  header: OverlayHeader;
  /** Bytes of the whole overlay, when known up front. */
  size: number | undefined;
  /** What the input is called in messages and manifests. */
  name: string;
  /** Once everything was read: CorruptInputError unless the whole file has its expected sha256. */
  verifyWhole(): void;
  /** For a download: bytes received and connections resumed so far. */
  transfer: HttpStreamInfo | undefined;
  close(): Promise<void>;
}

/** Passes `body` through, hashing every byte. */
async function* hashing(body: AsyncIterable<Uint8Array>, hash: Hash): AsyncGenerator<Uint8Array> {
  for await (const b of body) {
    hash.update(b);
    yield b;
  }
}

/**
 * Opens `input` and reads its header. `progress` sees a download (when the caller does not count
 * the bytes it consumes itself: the rebuild pipeline does).
 */
export async function openOverlayInput(
  input: OverlayInput,
  progress: Progress = silent,
  opts: { trust?: readonly TrustedKey[] } = {},
): Promise<OpenedOverlay> {
  let body: AsyncIterable<Uint8Array>;
  let size: number | undefined;
  let name: string;
  let stop = (): void => undefined;
  let verify = (): void => undefined;
  let transfer: HttpStreamInfo | undefined;
  if (input.kind === 'file') {
    name = resolve(input.path);
    const st = await stat(input.path).catch(() => undefined);
    if (!st) throw new NotFoundError(`overlay not found: ${input.path}`, { path: input.path });
    if (!st.isFile()) throw new NotFoundError(`overlay ${input.path} is not a file`, { path: input.path });
    // Random access first: a truncated, damaged or (with trusted keys) unsigned file fails here,
    // before the stream starts: header, signature, index (index_sha256) and footer.
    await (await OverlayReader.open(input.path, { trust: opts.trust })).close();
    size = st.size;
    const file = createReadStream(input.path, { highWaterMark: 1 << 20 });
    stop = () => file.destroy();
    body = file;
  } else if (input.kind === 'url') {
    name = input.name ?? input.url;
    const http = new HttpStream(input.url, {
      headers: input.headers,
      maxBytes: input.maxBytes,
      idleMs: input.idleMs,
      progress,
    });
    stop = () => http.close();
    body = http.body();
    transfer = http.info;
    if (input.sha256) {
      const want = input.sha256;
      const hash = createHash('sha256');
      body = hashing(body, hash);
      verify = () => {
        const got = hash.digest('hex');
        if (got !== want) {
          throw new CorruptInputError(`${name}: the download's sha256 is ${got}, the store says ${want}`, {
            url: input.url,
          });
        }
      };
    }
  } else {
    name = input.name;
    size = input.size;
    body = input.body;
  }
  // A stream checks the signature on its header and the index hash once the index arrives.
  const reader = new OverlayStreamReader(body, { trust: opts.trust });
  try {
    const { header } = await reader.open();
    return {
      reader,
      header,
      size: size ?? transfer?.size,
      name,
      verifyWhole: verify,
      transfer,
      async close() {
        stop();
        await reader.close().catch(() => undefined);
      },
    };
  } catch (err) {
    stop();
    await reader.close().catch(() => undefined);
    throw err;
  }
}
