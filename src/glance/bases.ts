/**
 * Bases in Glance: one image per base VM, the `base export` package (a sparse tar of the
 * library's base directory) with cloudlet_type=base_package, cloudlet_base_id and a summary of
 * the VM spec. A pull is checked against Glance's hash, then verified like `base import`.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { TOOL } from '../api/version.js';
import { importPackage, removeBase, resolveBaseId, showBase } from '../base/library.js';
import { readManifest } from '../base/manifest.js';
import { baseDir, basesDir, tmpDir } from '../base/paths.js';
import { fetchToFile } from '../net/fetch.js';
import { CorruptInputError, NetworkError, NotFoundError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';
import type { SessionOptions } from './auth.js';
import type { GlanceClient, GlanceImage } from './client.js';
import {
  BASE_ID,
  CloudletType,
  UUID,
  expectType,
  glanceImageId,
  glanceRef,
  isGlanceRef,
  openGlance,
  prop,
  sha256Of,
} from './image.js';
import { tarStream, uploadImage } from './upload.js';

/** A base package is as large as the base (GiBs): no overall deadline, only the idle timeout. */
const PACKAGE_TIMEOUT_MS = 24 * 3600_000;

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

export async function findBaseImage(client: GlanceClient, ref: string): Promise<GlanceImage> {
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
