/**
 * Glance as a store of cloudlet images (docs/openstack.md has the layout and why):
 *
 *   base package   one image per base VM: the `base export` package (a sparse tar of the
 *                  library's base directory), cloudlet_type=base_package,
 *                  cloudlet_base_id=<sha256>, and a summary of the VM spec as properties
 *   overlay        one image per overlay file, cloudlet_type=overlay, cloudlet_base_id=<sha256>
 *
 * Every upload is streamed and checked afterwards against what Glance says it stored (size and
 * hash); a failed or interrupted upload deletes its image, so only complete images stay
 * (status active). A pulled base is verified byte for byte like `base import` of a package;
 * an overlay is resolved to its /v2/images/ID/file URL with the auth headers, after checking
 * its type and base, for the synthesis pipeline to fetch (ranged GETs work: Glance answers 206).
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { PassThrough, pipeline, Transform, type Readable } from 'node:stream';
import { TOOL } from '../api/version.js';
import { importPackage, removeBase, resolveBaseId, showBase } from '../base/library.js';
import { readManifest } from '../base/manifest.js';
import { baseDir, basesDir, tmpDir } from '../base/paths.js';
import { fetchToFile } from '../net/fetch.js';
import { OverlayReader } from '../overlay/reader.js';
import { onCleanup } from '../util/cleanup.js';
import {
  BaseMismatchError,
  CloudletError,
  CorruptInputError,
  MissingToolError,
  NetworkError,
  NotFoundError,
  UsageError,
} from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';
import { glanceSession, type SessionOptions } from './auth.js';
import { GlanceClient, type GlanceImage } from './client.js';

/** The cloudlet_type property of each kind of image. */
export const CloudletType = { basePackage: 'base_package', overlay: 'overlay' } as const;

export const GLANCE_SCHEME = 'glance://';
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const BASE_ID = /^[0-9a-f]{64}$/;
/** Marks an image whose upload is in progress (removed once it is complete and checked). */
const UPLOAD_TAG = 'cloudlet_upload';
/** A base package is as large as the base (GiBs): no overall deadline, only the idle timeout. */
const PACKAGE_TIMEOUT_MS = 24 * 3600_000;

export function isGlanceRef(s: string): boolean {
  return s.toLowerCase().startsWith(GLANCE_SCHEME);
}

/** glance://IMAGE_ID → IMAGE_ID. */
export function glanceImageId(ref: string): string {
  const id = isGlanceRef(ref) ? ref.slice(GLANCE_SCHEME.length).replace(/\/+$/, '') : ref;
  if (!UUID.test(id)) throw new UsageError(`not a Glance image reference: ${ref} (expected glance://IMAGE_ID, a UUID)`);
  return id.toLowerCase();
}

export function glanceRef(imageId: string): string {
  return `${GLANCE_SCHEME}${imageId}`;
}

export async function openGlance(opts: SessionOptions = {}): Promise<GlanceClient> {
  return new GlanceClient(await glanceSession(opts));
}

function prop(image: GlanceImage, key: string): string | undefined {
  const v = image[key];
  return typeof v === 'string' ? v : undefined;
}

/** The sha256 of an image's data when Glance (or our push) recorded one. */
function sha256Of(image: GlanceImage): string | undefined {
  if (image.os_hash_algo === 'sha256' && image.os_hash_value) return image.os_hash_value;
  const ours = prop(image, 'cloudlet_sha256');
  return ours && /^[0-9a-f]{64}$/.test(ours) ? ours : undefined;
}

/** Checks that `image` is a complete image of the given cloudlet type. */
function expectType(client: GlanceClient, image: GlanceImage, type: string): void {
  const actual = prop(image, 'cloudlet_type');
  if (actual !== type) {
    throw new UsageError(
      `Glance image ${image.id} is ${actual ? `a cloudlet ${actual}` : 'not a cloudlet image (no cloudlet_type)'}, ` +
        `not ${type === CloudletType.overlay ? 'an overlay' : 'a base package'}`,
      { image: image.id, cloudlet_type: actual ?? null },
    );
  }
  if (image.status !== 'active') {
    throw new NotFoundError(`Glance image ${image.id} at ${client.endpoint} has no data yet (status ${image.status})`, {
      image: image.id,
      status: image.status,
    });
  }
}

// ---------------------------------------------------------------- overlays

export interface OverlaySource {
  /** GET this (with `headers`) for the overlay's bytes; Range requests are honoured. */
  url: string;
  headers: Record<string, string>;
  size?: number;
  /** sha256 of the whole file, when known (os_hash_value with hashing_algorithm = sha256). */
  sha256?: string;
  imageId: string;
  /** The base the overlay was made for (cloudlet_base_id). */
  baseId?: string;
}

export interface ResolveOptions extends SessionOptions {
  /** Refuse (BaseMismatchError) an overlay made for another base, before any download. */
  expectBase?: string;
}

/** glance://IMAGE_ID → where to read the overlay, after checking it is one (and for which base). */
export async function resolveOverlaySource(ref: string, opts: ResolveOptions = {}): Promise<OverlaySource> {
  const id = glanceImageId(ref);
  const client = await openGlance(opts);
  const image = await client.getImage(id);
  expectType(client, image, CloudletType.overlay);
  const baseId = prop(image, 'cloudlet_base_id');
  if (opts.expectBase && baseId !== opts.expectBase) {
    throw new BaseMismatchError(
      `Glance image ${id} is an overlay for base ${(baseId ?? 'unknown').slice(0, 12)}, ` +
        `not for base ${opts.expectBase.slice(0, 12)}`,
      { image: id, expected_base: baseId ?? null, actual_base: opts.expectBase },
    );
  }
  return {
    url: client.fileUrl(id),
    headers: client.authHeaders(),
    size: image.size ?? undefined,
    sha256: sha256Of(image),
    imageId: id,
    baseId,
  };
}

export interface OverlayPushResult {
  message_type: 'overlay_push';
  image_id: string;
  url: string;
  glance: string;
  base_id: string;
  name: string;
  size: number;
  sha256: string;
}

/** Uploads an overlay file (its header, footer and index checked first) as one image. */
export async function pushOverlay(
  file: string,
  opts: SessionOptions & { name?: string; visibility?: string; progress?: Progress } = {},
): Promise<OverlayPushResult> {
  const progress = opts.progress ?? silent;
  const reader = await OverlayReader.open(file);
  const { header, fileSize } = reader;
  await reader.close();
  const client = await openGlance(opts);
  const name = opts.name ?? basename(file);
  const properties: Record<string, string> = {
    cloudlet_type: CloudletType.overlay,
    cloudlet_base_id: header.base.id,
    cloudlet_overlay_version: `${header.version[0]}.${header.version[1]}`,
    cloudlet_resumable: String(header.targets.some((t) => t.kind === 'ram')),
    cloudlet_creator: TOOL,
  };
  if (header.memory) properties.cloudlet_machine = header.memory.machine;
  const up = await uploadImage(client, {
    image: { name, disk_format: 'raw', container_format: 'bare', visibility: opts.visibility, properties },
    data: () => createReadStream(file),
    size: fileSize,
    label: `uploading ${name}`,
    progress,
  });
  return {
    message_type: 'overlay_push',
    image_id: up.id,
    url: glanceRef(up.id),
    glance: client.endpoint,
    base_id: header.base.id,
    name,
    size: up.bytes,
    sha256: up.sha256,
  };
}

export interface GlanceOverlay {
  image_id: string;
  url: string;
  name: string | null;
  base_id?: string;
  size: number | null;
  status: string;
  created_at: string;
}

/** Overlays in Glance, all or those made for one base. */
export async function listOverlays(opts: SessionOptions & { base?: string } = {}): Promise<GlanceOverlay[]> {
  const client = await openGlance(opts);
  const filters: Record<string, string> = { cloudlet_type: CloudletType.overlay };
  if (opts.base) {
    // A full id as is; a name or id prefix through the base packages in Glance.
    filters.cloudlet_base_id = BASE_ID.test(opts.base)
      ? opts.base
      : (prop(await findBaseImage(client, opts.base), 'cloudlet_base_id') ?? opts.base);
  }
  const images = await client.listImages(filters);
  return images.map((i) => ({
    image_id: i.id,
    url: glanceRef(i.id),
    name: i.name,
    base_id: prop(i, 'cloudlet_base_id'),
    size: i.size,
    status: i.status,
    created_at: i.created_at,
  }));
}

/** Deletes an overlay image (refusing to delete anything that is not one). */
export async function removeOverlay(ref: string, opts: SessionOptions = {}): Promise<{ image_id: string }> {
  const id = glanceImageId(ref);
  const client = await openGlance(opts);
  const image = await client.getImage(id);
  // Any overlay image, also one whose upload never finished; nothing else.
  if (prop(image, 'cloudlet_type') !== CloudletType.overlay) expectType(client, image, CloudletType.overlay);
  await client.deleteImage(id);
  return { image_id: id };
}

// ---------------------------------------------------------------- bases

export interface GlanceBase {
  id: string;
  name?: string;
  image_id: string;
  machine?: string;
  memory_bytes?: number;
  disk_bytes?: number;
  /** Bytes of the package image. */
  size: number | null;
  created_at: string;
}

function toGlanceBase(i: GlanceImage): GlanceBase {
  const num = (k: string): number | undefined => {
    const v = prop(i, k);
    return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
  };
  return {
    id: prop(i, 'cloudlet_base_id') ?? '',
    name: prop(i, 'cloudlet_base_name'),
    image_id: i.id,
    machine: prop(i, 'cloudlet_machine'),
    memory_bytes: num('cloudlet_memory_bytes'),
    disk_bytes: num('cloudlet_disk_bytes'),
    size: i.size,
    created_at: i.created_at,
  };
}

/** The base packages in Glance (complete ones only), newest first. */
export async function listGlanceBases(opts: SessionOptions = {}): Promise<{ glance: string; bases: GlanceBase[] }> {
  const client = await openGlance(opts);
  const images = await client.listImages({
    cloudlet_type: CloudletType.basePackage,
    status: 'active',
    sort: 'created_at:desc',
  });
  return { glance: client.endpoint, bases: images.map(toGlanceBase).filter((b) => BASE_ID.test(b.id)) };
}

export interface BasePushResult {
  message_type: 'base_push';
  id: string;
  name?: string;
  image_id: string;
  url: string;
  glance: string;
  /** False when Glance already held a complete package of this base (nothing uploaded). */
  added: boolean;
  size: number;
  sha256?: string;
}

/** Uploads a library base as one package image, unless Glance already has it. */
export async function pushBase(
  root: string,
  ref: string,
  opts: SessionOptions & { visibility?: string; progress?: Progress } = {},
): Promise<BasePushResult> {
  const progress = opts.progress ?? silent;
  const id = await resolveBaseId(root, ref);
  const m = await showBase(root, id);
  const client = await openGlance(opts);
  const existing = await client.listImages({
    cloudlet_type: CloudletType.basePackage,
    cloudlet_base_id: id,
    status: 'active',
    sort: 'created_at:desc',
  });
  const result = { message_type: 'base_push' as const, id, name: m.name, glance: client.endpoint };
  if (existing[0]) {
    const e = existing[0];
    return { ...result, image_id: e.id, url: glanceRef(e.id), added: false, size: e.size ?? 0, sha256: sha256Of(e) };
  }
  const ram = m.targets.filter((t) => t.kind === 'ram').reduce((n, t) => n + t.size, 0);
  const vm = m.vm;
  const properties: Record<string, string> = {
    cloudlet_type: CloudletType.basePackage,
    cloudlet_base_id: id,
    cloudlet_package_format: 'tar-1',
    cloudlet_creator: TOOL,
  };
  const optional: Record<string, string | number | undefined> = {
    cloudlet_base_name: m.name,
    cloudlet_machine: m.memory?.machine ?? vm?.machine,
    cloudlet_memory_bytes: m.memory ? ram : undefined,
    cloudlet_disk_bytes: m.disk?.virtual_size,
    cloudlet_memory_mib: vm?.memoryMiB,
    cloudlet_cpu: vm?.cpu,
    cloudlet_smp: vm?.smp,
    cloudlet_direct_boot: vm ? String(Boolean(vm.kernel)) : undefined,
    cloudlet_nic: vm?.network?.model,
    cloudlet_qemu_version: m.qemu_version,
  };
  for (const [k, v] of Object.entries(optional))
    if (v !== undefined && String(v).length <= 255) properties[k] = String(v);
  const name = `cloudlet-base-${m.name ?? id.slice(0, 12)}`;
  const up = await uploadImage(client, {
    image: { name, disk_format: 'raw', container_format: 'bare', visibility: opts.visibility, properties },
    data: () => tarStream(['--sparse', '-cf', '-', '-C', basesDir(root), id]),
    size: undefined,
    label: `uploading base ${m.name ?? id.slice(0, 12)}`,
    total: m.stored_bytes,
    progress,
  });
  return { ...result, image_id: up.id, url: glanceRef(up.id), added: true, size: up.bytes, sha256: up.sha256 };
}

export interface BasePullResult {
  message_type: 'base_pull';
  id: string;
  name?: string;
  image_id: string;
  glance: string;
  /** False when the library already had the base (nothing downloaded). */
  added: boolean;
}

/**
 * Brings a base package from Glance into the library: by image (glance://ID or the bare UUID),
 * base id (or a unique prefix) or base name. The download is checked against Glance's hash and
 * the package verified like `base import` (every file against the base id) before it lands.
 */
export async function pullBase(
  root: string,
  ref: string,
  opts: SessionOptions & { progress?: Progress } = {},
): Promise<BasePullResult> {
  const progress = opts.progress ?? silent;
  const client = await openGlance(opts);
  const image = await findBaseImage(client, ref);
  const id = prop(image, 'cloudlet_base_id') ?? '';
  if (!BASE_ID.test(id))
    throw new CorruptInputError(`Glance image ${image.id} has no valid cloudlet_base_id`, { image: image.id });
  const result = {
    message_type: 'base_pull' as const,
    id,
    name: prop(image, 'cloudlet_base_name'),
    image_id: image.id,
  };
  if (await readManifest(join(baseDir(root, id), 'manifest.json')).catch(() => undefined)) {
    return { ...result, glance: client.endpoint, added: false };
  }
  await mkdir(tmpDir(root), { recursive: true });
  const fetched = await fetchToFile(client.fileUrl(image.id), tmpDir(root), progress, PACKAGE_TIMEOUT_MS, {
    headers: client.authHeaders(),
    sha256: sha256Of(image),
  });
  try {
    if (image.size !== null && fetched.bytes !== image.size) {
      throw new NetworkError(
        `download of Glance image ${image.id} ended after ${fetched.bytes} of ${image.size} bytes`,
      );
    }
    const r = await importPackage(root, fetched.path, progress);
    if (r.id !== id) {
      if (r.added) await removeBase(root, r.id);
      throw new CorruptInputError(
        `Glance image ${image.id} holds base ${r.id.slice(0, 12)}, not ${id.slice(0, 12)} as it claims`,
        {
          image: image.id,
        },
      );
    }
    return { ...result, glance: client.endpoint, added: r.added };
  } catch (err) {
    // importPackage names the temporary download; name the image instead.
    if (err instanceof CorruptInputError && err.message.startsWith(fetched.path)) {
      throw new CorruptInputError(`Glance image ${image.id}${err.message.slice(fetched.path.length)}`, {
        image: image.id,
      });
    }
    throw err;
  } finally {
    await fetched.remove();
  }
}

async function findBaseImage(client: GlanceClient, ref: string): Promise<GlanceImage> {
  if (isGlanceRef(ref) || UUID.test(ref)) {
    const image = await client.getImage(glanceImageId(ref));
    expectType(client, image, CloudletType.basePackage);
    return image;
  }
  const all = await client.listImages({
    cloudlet_type: CloudletType.basePackage,
    status: 'active',
    sort: 'created_at:desc',
  });
  const r = ref.toLowerCase();
  const hits = all.filter((i) => {
    const id = prop(i, 'cloudlet_base_id') ?? '';
    return (r.length >= 4 && /^[0-9a-f]+$/.test(r) && id.startsWith(r)) || prop(i, 'cloudlet_base_name') === ref;
  });
  const ids = [...new Set(hits.map((h) => prop(h, 'cloudlet_base_id')))];
  if (ids.length === 0) {
    throw new NotFoundError(
      `no base ${ref} in Glance at ${client.endpoint} (see: cloudlet-overlay base list --glance)`,
      {
        base: ref,
      },
    );
  }
  if (ids.length > 1)
    throw new NotFoundError(`base ${ref} is ambiguous in Glance: ${ids.map((i) => i?.slice(0, 12)).join(', ')}`);
  return hits[0]!;
}

// ---------------------------------------------------------------- uploads

interface UploadSpec {
  image: Parameters<GlanceClient['createImage']>[0];
  /** Opened only once the image exists. */
  data: () => Readable;
  size: number | undefined;
  label: string;
  /** For the progress percentage when `size` is unknown (an estimate). */
  total?: number;
  progress: Progress;
}

/**
 * Creates an image, streams its data, checks what Glance stored (status, size, hash) and
 * records our sha256 as cloudlet_sha256 (Glance's own os_hash_value is sha512 by default).
 * Any failure, or an interrupt, deletes the image.
 */
async function uploadImage(
  client: GlanceClient,
  spec: UploadSpec,
): Promise<{ id: string; bytes: number; sha256: string }> {
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
    const source = spec.data();
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

/** `tar ARGS` on stdout as a stream that fails (instead of ending short) when tar fails; exported for tests. */
export function tarStream(args: string[]): Readable {
  const out = new PassThrough();
  const child = spawn('tar', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => {
    if (stderr.length < 4096) stderr += c.toString('utf8');
  });
  const exited = new Promise<Error | undefined>((resolve) => {
    child.once('error', (err: NodeJS.ErrnoException) =>
      resolve(err.code === 'ENOENT' ? new MissingToolError('tar is not installed (Debian package tar)') : err),
    );
    child.once('close', (code, signal) =>
      resolve(
        code === 0
          ? undefined
          : new CorruptInputError(`tar failed (${signal ?? code}): ${stderr.trim().split('\n').pop()}`),
      ),
    );
  });
  child.stdout.on('data', (c: Buffer) => {
    if (!out.write(c)) child.stdout.pause();
  });
  out.on('drain', () => child.stdout.resume());
  child.stdout.once('end', () => void exited.then((err) => (err ? out.destroy(err) : out.end())));
  void exited.then((err) => err && out.destroy(err));
  out.once('close', () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  });
  return out;
}
