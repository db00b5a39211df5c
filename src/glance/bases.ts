/**
 * Base packages in Glance: one image per base VM, cloudlet_type=base_package, cloudlet_base_id
 * and a summary of the VM spec as properties. The image's data is the `base export` package;
 * here it is opaque bytes (api/glance.ts makes it from the library and imports it back).
 */
import { CorruptInputError, NotFoundError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';
import { TOOL } from '../util/version.js';
import type { GlanceClient, GlanceImage } from './client.js';
import { BASE_ID, CloudletType, UUID, expectType, glanceImageId, isGlanceRef, prop } from './image.js';
import { uploadImage, type UploadSpec, type Uploaded } from './upload.js';

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

/** What a base package image records about its base (as properties; the manifest has it all). */
export interface BasePackageInfo {
  baseId: string;
  name?: string;
  machine?: string;
  memoryBytes?: number;
  diskBytes?: number;
  memoryMiB?: number;
  cpu?: string;
  smp?: number;
  directBoot?: boolean;
  nic?: string;
  qemuVersion?: string;
}

/** The complete package images, newest first. */
const ACTIVE_PACKAGES = { cloudlet_type: CloudletType.basePackage, status: 'active', sort: 'created_at:desc' };

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

/** The base packages in Glance (complete ones with a valid base id), newest first. */
export async function listBasePackages(client: GlanceClient): Promise<GlanceBase[]> {
  const images = await client.listImages(ACTIVE_PACKAGES);
  return images.map(toGlanceBase).filter((b) => BASE_ID.test(b.id));
}

/** The newest complete package of base `id`, when Glance has one. */
export async function findBasePackage(client: GlanceClient, id: string): Promise<GlanceImage | undefined> {
  const [newest] = await client.listImages({ ...ACTIVE_PACKAGES, cloudlet_base_id: id });
  return newest;
}

/** The base id a package image claims (checked again against the package's contents on import). */
export function packageBaseId(image: GlanceImage): string {
  const id = prop(image, 'cloudlet_base_id') ?? '';
  if (!BASE_ID.test(id))
    throw new CorruptInputError(`Glance image ${image.id} has no valid cloudlet_base_id`, { image: image.id });
  return id;
}

/**
 * A base package image by reference: glance://IMAGE_ID or the bare UUID (checked to be a
 * complete package), else a base id, unique id prefix (≥ 4 hex digits) or base name among the
 * complete packages, the newest one when a base was pushed more than once.
 */
export async function findBaseImage(client: GlanceClient, ref: string): Promise<GlanceImage> {
  if (isGlanceRef(ref) || UUID.test(ref)) {
    const image = await client.getImage(glanceImageId(ref));
    expectType(client, image, CloudletType.basePackage);
    return image;
  }
  const all = await client.listImages(ACTIVE_PACKAGES);
  const r = ref.toLowerCase();
  const hits = all.filter((i) => {
    const id = prop(i, 'cloudlet_base_id') ?? '';
    return (r.length >= 4 && /^[0-9a-f]+$/.test(r) && id.startsWith(r)) || prop(i, 'cloudlet_base_name') === ref;
  });
  const ids = [...new Set(hits.map((h) => prop(h, 'cloudlet_base_id') ?? ''))];
  const [newest] = hits;
  if (!newest)
    throw new NotFoundError(
      `no base ${ref} in Glance at ${client.endpoint} (see: cloudlet-overlay base list --glance)`,
      {
        base: ref,
      },
    );
  if (ids.length > 1)
    throw new NotFoundError(`base ${ref} is ambiguous in Glance: ${ids.map((i) => i.slice(0, 12)).join(', ')}`, {
      base: ref,
    });
  return newest;
}

/** Uploads a base package (`data`: the package bytes, streamed) as one checked image. */
export async function uploadBasePackage(
  client: GlanceClient,
  info: BasePackageInfo,
  opts: {
    data: UploadSpec['data'];
    /** The package's approximate size, for progress. */
    total?: number;
    visibility?: string;
    progress: Progress;
  },
): Promise<Uploaded> {
  const properties: Record<string, string> = {
    cloudlet_type: CloudletType.basePackage,
    cloudlet_base_id: info.baseId,
    cloudlet_package_format: 'tar-1',
    cloudlet_creator: TOOL,
  };
  const optional: Record<string, string | number | boolean | undefined> = {
    cloudlet_base_name: info.name,
    cloudlet_machine: info.machine,
    cloudlet_memory_bytes: info.memoryBytes,
    cloudlet_disk_bytes: info.diskBytes,
    cloudlet_memory_mib: info.memoryMiB,
    cloudlet_cpu: info.cpu,
    cloudlet_smp: info.smp,
    cloudlet_direct_boot: info.directBoot,
    cloudlet_nic: info.nic,
    cloudlet_qemu_version: info.qemuVersion,
  };
  // Glance keeps property values of ≤ 255 characters; the manifest in the package has them all.
  for (const [k, v] of Object.entries(optional))
    if (v !== undefined && String(v).length <= 255) properties[k] = String(v);
  const label = info.name ?? info.baseId.slice(0, 12);
  return uploadImage(client, {
    image: {
      name: `cloudlet-base-${label}`,
      disk_format: 'raw',
      container_format: 'bare',
      visibility: opts.visibility,
      properties,
    },
    data: opts.data,
    size: undefined,
    label: `uploading base ${label}`,
    total: opts.total,
    progress: opts.progress,
  });
}
