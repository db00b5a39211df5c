/**
 * Uploading an image so that only complete, checked images stay in Glance: created with a
 * one-time tag, streamed, compared with what Glance says it stored, then untagged; any failure
 * or interrupt deletes it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { pipeline, Transform, type Readable } from 'node:stream';
import { onCleanup } from '../util/cleanup.js';
import { CloudletError, NetworkError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';
import type { GlanceClient, NewImage } from './client.js';

/** Marks an image whose upload is in progress (removed once it is complete and checked). */
const UPLOAD_TAG = 'cloudlet_upload';

export interface UploadSpec {
  image: NewImage;
  /**
   * Opened only once the image exists. A source must fail (destroy itself with an error), not
   * end, when it cannot deliver everything: a cleanly ended short body is a complete image.
   */
  data: () => Readable | Promise<Readable>;
  size: number | undefined;
  label: string;
  /** For the progress percentage when `size` is unknown (an estimate). */
  total?: number;
  progress: Progress;
}

export interface Uploaded {
  id: string;
  bytes: number;
  sha256: string;
}

/**
 * Creates an image, streams its data, checks what Glance stored (status, size, hash) and
 * records our sha256 as cloudlet_sha256 (Glance's own os_hash_value is sha512 by default).
 * Any failure, or an interrupt, deletes the image.
 */
export async function uploadImage(client: GlanceClient, spec: UploadSpec): Promise<Uploaded> {
  // An interrupt may come while Glance creates the image, before we know its id: the image
  // carries a one-time tag until it is complete, and cleanup finds it by that tag.
  const tag = randomBytes(12).toString('hex');
  let id: string | undefined;
  const drop = async (): Promise<void> => {
    const ids = id ? [id] : (await client.listImages({ [UPLOAD_TAG]: tag }).catch(() => [])).map((i) => i.id);
    for (const i of ids) await client.deleteImage(i).catch(() => undefined);
  };
  const unregister = onCleanup(drop);
  try {
    id = (await client.createImage({ ...spec.image, properties: { ...spec.image.properties, [UPLOAD_TAG]: tag } })).id;
  } catch (err) {
    unregister();
    throw err;
  }
  try {
    spec.progress.step(spec.label, spec.size ?? spec.total);
    const md5 = createHash('md5');
    const source = await spec.data();
    const tee = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        md5.update(chunk);
        cb(null, chunk);
      },
    });
    const up = await client.upload(
      id,
      pipeline(source, tee, () => undefined),
      spec.size,
      spec.progress,
    );
    const stored = await client.getImage(id);
    const want = stored.os_hash_algo === 'sha256' ? up.sha256 : undefined;
    const problems: string[] = [];
    if (stored.status !== 'active') problems.push(`status ${stored.status}`);
    if (stored.size !== up.bytes) problems.push(`${stored.size} bytes stored of ${up.bytes} sent`);
    if (want && stored.os_hash_value !== want) problems.push('os_hash_value differs from the sha256 sent');
    if (typeof stored.checksum === 'string' && stored.checksum !== md5.digest('hex'))
      problems.push('checksum (md5) differs');
    if (problems.length > 0) throw new NetworkError(`Glance did not store image ${id} as sent: ${problems.join('; ')}`);
    await client.setProperties(id, { cloudlet_sha256: up.sha256 }, [UPLOAD_TAG]);
    spec.progress.done(`uploaded ${spec.label.replace(/^uploading /, '')} as image ${id}`);
    unregister();
    return { id, bytes: up.bytes, sha256: up.sha256 };
  } catch (err) {
    spec.progress.fail(`${spec.label} failed`);
    await drop();
    unregister();
    if (err instanceof CloudletError) throw err;
    throw new NetworkError(`upload of image ${id} failed: ${(err as Error).message}`, { image: id });
  }
}
